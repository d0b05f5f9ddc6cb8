"""Input pipeline (TFDS + tf.data, TF kept off the accelerators) and the offline demo dataset.

Public API::

    from convmae_jax import data
    it = data.create_pretrain_dataset("imagenet2012", split="train", global_batch_size=4096,
                                      image_size=224, seed=0, start_step=step)
    batch = next(it)                      # {"image": float32 (4096 // process_count, 224, 224, 3)}
    eval_images = data.create_eval_batch("convmae_demo_photos", split="test", num_images=5,
                                         image_size=64)
    data.check_dataset(name, split=..., data_dir=...)   # cheap: name, presence on disk, split
    data.num_examples(name, split=..., data_dir=...)
    data.IMAGENET_MEAN, data.IMAGENET_STD, data.denormalize(x), data.to_uint8(x)

Importing this package registers the TFDS datasets ``convmae_demo_photos`` (see `demo_photos`) and
``convmae_demo_digits`` (labelled digits, see `demo_digits`) and ``convmae_demo_segments`` (digits
pasted on photos, labelled per pixel, see `demo_segments`); `get_builder` prepares either offline
when missing. It does not import TensorFlow; the first pipeline call does.
"""

from convmae_jax.data import demo_photos
from convmae_jax.data import demo_digits
from convmae_jax.data import demo_segments
from convmae_jax.data.demo_photos import ConvmaeDemoPhotos
from convmae_jax.data.pipeline import (
    BAD_KEY,
    ID_KEY,
    REASON_KEY,
    DEFAULT_SHUFFLE_BUFFER,
    DEMO_DATASET,
    EMBEDDED_DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotPreparedError,
    PretrainIterator,
    check_dataset,
    create_eval_batch,
    create_pretrain_dataset,
    denormalize,
    get_builder,
    num_examples,
    to_uint8,
)

DEMO_DIGITS = demo_digits.NAME

__all__ = [
    "BAD_KEY",
    "ID_KEY",
    "REASON_KEY",
    "DEFAULT_SHUFFLE_BUFFER",
    "DEMO_DATASET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ConvmaeDemoPhotos",
    "DatasetNotPreparedError",
    "PretrainIterator",
    "check_dataset",
    "create_eval_batch",
    "create_pretrain_dataset",
    "demo_photos",
    "denormalize",
    "get_builder",
    "num_examples",
    "to_uint8",
    "demo_digits",
    "demo_segments",
    "DEMO_DIGITS",
    "EMBEDDED_DATASETS",
]
