"""PyTorch interop: official key tables, JAX<->PyTorch parity, round trips, refusals, CLI.

CPU only. The Base models are built once per module (fixtures); everything else uses tiny configs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import argparse

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

from convmae_jax import checkpoints, interop, models  # noqa: E402
from convmae_jax.interop import torch_reference  # noqa: E402
from convmae_jax.interop.__main__ import main as cli_main  # noqa: E402
from convmae_jax.interop.files import infer_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RTOL = 1e-5
PRED_ATOL = 1e-4
LOGITS_ATOL = 1e-4
CLASSIFIER_ONLY = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


# ------------------------------------------------------------------------------------------------
# official state-dict tables, written out independently of the code under test

def official_base_encoder_keys() -> dict[str, tuple]:
    t: dict[str, tuple] = {"pos_embed": (1, 196, 768)}
    for i, (cin, cout, p) in enumerate([(3, 256, 4), (256, 384, 2), (384, 768, 2)], start=1):
        t[f"patch_embed{i}.proj.weight"] = (cout, cin, p, p)
        t[f"patch_embed{i}.proj.bias"] = (cout,)
        t[f"patch_embed{i}.norm.weight"] = (cout,)
        t[f"patch_embed{i}.norm.bias"] = (cout,)
    t["patch_embed4.weight"] = (768, 768)
    t["patch_embed4.bias"] = (768,)
    for stage, c in ((1, 256), (2, 384)):
        for b in range(2):
            p = f"blocks{stage}.{b}."
            t.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                      p + "conv1.weight": (c, c, 1, 1), p + "conv1.bias": (c,),
                      p + "conv2.weight": (c, c, 1, 1), p + "conv2.bias": (c,),
                      p + "attn.weight": (c, 1, 5, 5), p + "attn.bias": (c,),
                      p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                      p + "mlp.fc1.weight": (4 * c, c, 1, 1), p + "mlp.fc1.bias": (4 * c,),
                      p + "mlp.fc2.weight": (c, 4 * c, 1, 1), p + "mlp.fc2.bias": (c,)})
    for b in range(11):
        t.update(_transformer_block(f"blocks3.{b}.", 768))
    return t


def _transformer_block(p: str, d: int) -> dict[str, tuple]:
    return {p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
            p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,)}


def official_base_pretrain_keys() -> dict[str, tuple]:
    t = official_base_encoder_keys()
    t.update({"mask_token": (1, 1, 512), "decoder_pos_embed": (1, 196, 512),
              "stage1_output_decode.weight": (768, 256, 4, 4), "stage1_output_decode.bias": (768,),
              "stage2_output_decode.weight": (768, 384, 2, 2), "stage2_output_decode.bias": (768,),
              "norm.weight": (768,), "norm.bias": (768,),
              "decoder_embed.weight": (512, 768), "decoder_embed.bias": (512,),
              "decoder_norm.weight": (512,), "decoder_norm.bias": (512,),
              "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,)})
    for b in range(8):
        t.update(_transformer_block(f"decoder_blocks.{b}.", 512))
    return t


def official_base_classifier_keys() -> dict[str, tuple]:
    t = official_base_encoder_keys()
    t.update({"fc_norm.weight": (768,), "fc_norm.bias": (768,),
              "head.weight": (1000, 768), "head.bias": (1000,)})
    return t


# ------------------------------------------------------------------------------------------------
# helpers

def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_torch_sd(sd: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def inputs(seed: int, n: int, size: int, chans: int, num_patches: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size, size, chans)).astype(np.float32)
    noise = rng.random((n, num_patches)).astype(np.float32)
    return x, noise


@nnx.jit
def _jax_pretrain(model, x, noise):
    return model(x, noise=noise)


@nnx.jit
def _jax_classify(model, x):
    return model(x)


def pretrain_parity(model, tmodel, x, noise):
    """(loss rel diff, pred max abs diff, masks equal) for the same weights and noise."""
    loss, pred, mask = _jax_pretrain(model, jnp.asarray(x), jnp.asarray(noise))
    with torch.no_grad():
        tloss, tpred, tmask = tmodel(nchw(x), noise=torch.from_numpy(noise))
    rel = abs(float(loss) - tloss.item()) / abs(tloss.item())
    pred_diff = float(np.abs(np.asarray(pred) - tpred.numpy()).max())
    return rel, pred_diff, np.array_equal(np.asarray(mask), tmask.numpy()), tpred.shape


def classifier_diff(model, tmodel, x) -> float:
    logits = np.asarray(_jax_classify(model, jnp.asarray(x)))
    with torch.no_grad():
        tlogits = tmodel(nchw(x)).numpy()
    assert logits.shape == tlogits.shape
    return float(np.abs(logits - tlogits).max())


# ------------------------------------------------------------------------------------------------
# fixtures (Base built once per module)

@pytest.fixture(scope="module")
def base_pretrain():
    model = models.create("convmae_base", rngs=nnx.Rngs(0), img_size=224, norm_pix_loss=True)
    return model, interop.to_torch_state_dict(model)


@pytest.fixture(scope="module")
def base_classifier(base_pretrain):
    _, pre_sd = base_pretrain
    clf = models.create("convvit_base", rngs=nnx.Rngs(1), num_classes=1000)
    clf.eval()
    report = interop.load_torch_state_dict(clf, pre_sd)
    return clf, report


# ------------------------------------------------------------------------------------------------
# import hygiene

def test_importing_interop_and_models_does_not_import_torch():
    code = ("import sys; import convmae_jax.interop as i; import convmae_jax.models; "
            "from convmae_jax.interop import to_torch_state_dict, load_torch_state_dict; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# key tables

def test_base_pretrain_export_matches_official_table(base_pretrain):
    _, sd = base_pretrain
    table = official_base_pretrain_keys()
    assert len(table) == 313 and len(sd) == 313
    assert set(sd) == set(table)
    assert {k: tuple(v.shape) for k, v in sd.items()} == table
    assert all(v.dtype == np.float32 for v in sd.values())
    assert sum(v.size for v in sd.values()) == 115_041_408
    # the PyTorch reference has the same keys, shapes and order
    tm = torch_reference.ConvMAETorch(norm_pix_loss=True)
    tsd = tm.state_dict()
    assert list(tsd) == list(sd)
    assert {k: tuple(v.shape) for k, v in tsd.items()} == table
    # spot checks of layout-sensitive entries
    assert sd["blocks1.0.attn.weight"].shape == (256, 1, 5, 5)
    assert sd["blocks2.1.mlp.fc1.weight"].shape == (1536, 384, 1, 1)
    assert sd["blocks3.10.attn.qkv.weight"].shape == (2304, 768)
    assert sd["stage1_output_decode.weight"].shape == (768, 256, 4, 4)
    # fixed sin-cos embeddings are exported as they are
    np.testing.assert_array_equal(sd["pos_embed"], models.sincos_2d(768, 14))
    np.testing.assert_array_equal(sd["decoder_pos_embed"], models.sincos_2d(512, 14))


def test_base_classifier_export_matches_official_table(base_classifier):
    clf, _ = base_classifier
    sd = interop.to_torch_state_dict(clf)
    table = official_base_classifier_keys()
    assert len(table) == 207 and len(sd) == 207
    assert {k: tuple(v.shape) for k, v in sd.items()} == table
    assert sum(v.size for v in sd.values()) == 85_374_824
    tsd = torch_reference.ConvViTTorch(num_classes=1000, global_pool=True).state_dict()
    assert list(tsd) == list(sd)


# ------------------------------------------------------------------------------------------------
# parity: same weights, same noise

@pytest.mark.parametrize("overrides", [
    dict(img_size=64, norm_pix_loss=True),
    dict(img_size=48, norm_pix_loss=False, mask_ratio=0.6, in_chans=1, mlp_ratios=(4.0, 2.0, 3.0),
         decoder_mlp_ratio=2.0),
])
def test_tiny_pretrain_parity_jax_to_torch(overrides):
    model = models.create("convmae_tiny", rngs=nnx.Rngs(0), **overrides)
    tm = interop.torch_model("convmae_tiny", **overrides)
    tm.load_state_dict(to_torch_sd(interop.to_torch_state_dict(model)), strict=True)
    x, noise = inputs(0, 2, overrides["img_size"], overrides.get("in_chans", 3), model.num_patches)
    rel, pred_diff, same_mask, pred_shape = pretrain_parity(model, tm, x, noise)
    print(f"tiny {overrides}: loss rel diff {rel:.3g}, pred max abs diff {pred_diff:.3g}")
    assert same_mask
    assert pred_shape == (2, model.num_patches, 256 * overrides.get("in_chans", 3))
    assert rel <= LOSS_RTOL
    assert pred_diff <= PRED_ATOL


def test_tiny_pretrain_parity_torch_to_jax():
    torch.manual_seed(0)
    tm = interop.torch_model("convmae_tiny", img_size=64)
    model = models.create("convmae_tiny", rngs=nnx.Rngs(5), img_size=64)
    report = interop.load_torch_state_dict(model, tm.state_dict())  # torch tensors accepted
    assert len(report.loaded) == len(tm.state_dict()) and not report.missing
    x, noise = inputs(1, 2, 64, 3, model.num_patches)
    rel, pred_diff, same_mask, _ = pretrain_parity(model, tm, x, noise)
    print(f"tiny torch->jax: loss rel diff {rel:.3g}, pred max abs diff {pred_diff:.3g}")
    assert same_mask and rel <= LOSS_RTOL and pred_diff <= PRED_ATOL


def test_base_pretrain_parity(base_pretrain):
    model, sd = base_pretrain
    tm = interop.torch_model("convmae_base", img_size=224, norm_pix_loss=True)
    tm.load_state_dict(to_torch_sd(sd), strict=True)
    x, noise = inputs(2, 1, 224, 3, 196)
    rel, pred_diff, same_mask, pred_shape = pretrain_parity(model, tm, x, noise)
    print(f"base: loss rel diff {rel:.3g}, pred max abs diff {pred_diff:.3g}")
    assert same_mask and pred_shape == (1, 196, 768)
    assert rel <= LOSS_RTOL
    assert pred_diff <= PRED_ATOL


@pytest.mark.parametrize("global_pool", [True, False])
def test_tiny_classifier_parity(global_pool):
    clf = models.create("convvit_tiny", rngs=nnx.Rngs(1), img_size=64, num_classes=10,
                        global_pool=global_pool)
    clf.eval()
    tc = interop.torch_model("convvit_tiny", img_size=64, num_classes=10, global_pool=global_pool)
    tc.eval()
    tc.load_state_dict(to_torch_sd(interop.to_torch_state_dict(clf)), strict=True)
    x, _ = inputs(3, 2, 64, 3, 16)
    diff = classifier_diff(clf, tc, x)
    print(f"tiny classifier global_pool={global_pool}: logits max abs diff {diff:.3g}")
    assert diff <= LOGITS_ATOL
    # multi-scale features agree too (NHWC vs NCHW)
    feats = clf.features(jnp.asarray(x))
    with torch.no_grad():
        tfeats = tc.forward_features(nchw(x))
    for name in ("stride4", "stride8", "stride16"):
        np.testing.assert_allclose(np.asarray(feats[name]),
                                   tfeats[name].numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_base_classifier_parity(base_classifier):
    clf, _ = base_classifier
    tc = interop.torch_model("convvit_base", num_classes=1000).eval()
    tc.load_state_dict(to_torch_sd(interop.to_torch_state_dict(clf)), strict=True)
    x, _ = inputs(4, 1, 224, 3, 196)
    diff = classifier_diff(clf, tc, x)
    print(f"base classifier: logits max abs diff {diff:.3g}")
    assert diff <= LOGITS_ATOL


# ------------------------------------------------------------------------------------------------
# round trips and encoder transfer

def test_export_import_round_trip_is_bit_exact():
    src = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32)
    sd = interop.to_torch_state_dict(src)
    dst = models.create("convmae_tiny", rngs=nnx.Rngs(1), img_size=32)
    assert not np.array_equal(interop.to_torch_state_dict(dst)["blocks3.0.attn.qkv.weight"],
                              sd["blocks3.0.attn.qkv.weight"])
    report = interop.load_torch_state_dict(dst, sd)
    assert report.loaded == list(sd) and not (report.missing or report.unexpected or report.ignored)
    back = interop.to_torch_state_dict(dst)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].tobytes() == sd[k].tobytes(), k
    # the NNX parameters themselves are identical, in their own layouts
    param_filter = nnx.Any(nnx.Param, models.FrozenPosEmbed)
    a = nnx.to_pure_dict(nnx.state(src, param_filter))
    b = nnx.to_pure_dict(nnx.state(dst, param_filter))
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # and through a PyTorch module and back
    tm = interop.torch_model("convmae_tiny", img_size=32)
    tm.load_state_dict(to_torch_sd(sd), strict=True)
    third = models.create("convmae_tiny", rngs=nnx.Rngs(2), img_size=32)
    interop.load_torch_state_dict(third, tm.state_dict())
    again = interop.to_torch_state_dict(third)
    assert all(again[k].tobytes() == sd[k].tobytes() for k in sd)


def test_base_pretrain_into_classifier_reports_classifier_keys_missing(base_pretrain, base_classifier):
    pre, pre_sd = base_pretrain
    clf, report = base_classifier
    assert set(report.missing) == CLASSIFIER_ONLY and len(report.missing) == 4
    assert report.unexpected == []
    assert len(report.ignored) == 110
    assert len(report.loaded) == 203
    assert set(report.loaded) | set(report.ignored) == set(pre_sd)
    clf_sd = interop.to_torch_state_dict(clf)
    for k in report.loaded:
        np.testing.assert_array_equal(clf_sd[k], pre_sd[k])
    # the pretraining model is untouched and the classifier pos_embed stays a trainable Param
    assert isinstance(clf.pos_embed, nnx.Param)


def test_tiny_pretrain_into_classifier_without_global_pool_takes_norm():
    pre = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32)
    sd = interop.to_torch_state_dict(pre)
    clf = models.create("convvit_tiny", rngs=nnx.Rngs(1), img_size=32, global_pool=False,
                        num_classes=7)
    report = interop.load_torch_state_dict(clf, sd)
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert "norm.weight" in report.loaded and "norm.weight" not in report.ignored
    np.testing.assert_array_equal(interop.to_torch_state_dict(clf)["norm.weight"], sd["norm.weight"])
    # a fine-tuned classifier state dict loads exactly, nothing missing
    clf2 = models.create("convvit_tiny", rngs=nnx.Rngs(2), img_size=32, global_pool=False,
                         num_classes=7)
    report2 = interop.load_torch_state_dict(clf2, interop.to_torch_state_dict(clf))
    assert not (report2.missing or report2.unexpected or report2.ignored)


# ------------------------------------------------------------------------------------------------
# refusals

@pytest.fixture
def tiny_pair():
    model = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32)
    other = models.create("convmae_tiny", rngs=nnx.Rngs(9), img_size=32)
    return model, interop.to_torch_state_dict(other)


def _assert_refused(model, sd, *needles, strict=True):
    before = interop.to_torch_state_dict(model)
    with pytest.raises(ValueError) as err:
        interop.load_torch_state_dict(model, sd, strict=strict)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    after = interop.to_torch_state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing written
    return str(err.value)


def test_missing_key_refused(tiny_pair):
    model, sd = tiny_pair
    del sd["blocks1.0.attn.weight"]
    _assert_refused(model, sd, "missing", "blocks1.0.attn.weight")


def test_unexpected_key_refused(tiny_pair):
    model, sd = tiny_pair
    sd["blocks3.7.attn.qkv.weight"] = np.zeros((192, 64), np.float32)
    _assert_refused(model, sd, "unexpected", "blocks3.7.attn.qkv.weight")


def test_wrong_shape_refused_even_when_not_strict(tiny_pair):
    model, sd = tiny_pair
    sd["decoder_pred.weight"] = sd["decoder_pred.weight"][:, :-1]
    msg = _assert_refused(model, sd, "decoder_pred.weight", "(768, 31)", "(768, 32)", strict=False)
    assert "wrong shape" in msg


def test_many_bad_keys_named_at_least_ten(tiny_pair):
    model, sd = tiny_pair
    gone = [k for k in sd if k.startswith("decoder_blocks.0.")]  # 12 keys
    for k in gone:
        del sd[k]
    msg = _assert_refused(model, sd, "12 missing")
    assert sum(k in msg for k in gone) >= 10


def test_classifier_state_dict_into_pretraining_model_refused():
    clf = models.create("convvit_tiny", rngs=nnx.Rngs(0), img_size=32, num_classes=5)
    model = models.create("convmae_tiny", rngs=nnx.Rngs(1), img_size=32)
    sd = interop.to_torch_state_dict(clf)
    _assert_refused(model, sd, "missing", "mask_token", "unexpected", "head.weight")
    report = interop.load_torch_state_dict(model, sd, strict=False)
    assert set(report.unexpected) == CLASSIFIER_ONLY
    assert "decoder_embed.weight" in report.missing and len(report.loaded) == len(sd) - 4


def test_wrapped_and_module_prefixed_state_dicts_accepted(tiny_pair):
    model, sd = tiny_pair
    report = interop.load_torch_state_dict(model, {"model": {f"module.{k}": v for k, v in sd.items()}})
    assert len(report.loaded) == len(sd)
    out = interop.to_torch_state_dict(model)
    assert all(np.array_equal(out[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------------------
# reference init follows the official init (distribution bounds, fixed embeddings)

def test_torch_reference_init_follows_spec():
    torch.manual_seed(0)
    tm = torch_reference.ConvMAETorch()  # Base, 224
    sd = tm.state_dict()
    np.testing.assert_array_equal(sd["pos_embed"].numpy(), models.sincos_2d(768, 14))
    assert abs(sd["patch_embed3.proj.weight"].abs().max().item() - 0.05103) < 5e-4  # xavier, 2-D view
    assert sd["patch_embed3.proj.bias"].abs().max().item() <= 0.02552
    assert abs(sd["blocks3.0.attn.qkv.weight"].abs().max().item() - 0.04419) < 5e-4
    assert sd["blocks1.0.attn.weight"].abs().max().item() <= 0.2
    assert abs(sd["mask_token"].std().item() - 0.02) < 0.004
    assert not tm.pos_embed.requires_grad and not tm.decoder_pos_embed.requires_grad
    assert float(sd["blocks3.0.attn.qkv.bias"].abs().max()) == 0.0
    assert float((sd["norm.weight"] - 1).abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------
# command line

@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("interop_cli") / "work"
    model = models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32)
    meta = {"model_name": "convmae_tiny", "model_kwargs": model.config.to_dict()}
    checkpoints.save_model(wd, model, meta, step=3)
    # step 8 looks like a training checkpoint: items model, opt_state and meta
    later = models.create("convmae_tiny", rngs=nnx.Rngs(1), img_size=32)
    mgr = checkpoints.create_manager(wd, async_save=False)
    mgr.save(8, args=ocp.args.Composite(**{
        checkpoints.MODEL_ITEM: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(later))),
        checkpoints.OPT_STATE_ITEM: ocp.args.StandardSave({"mu": np.ones(3, np.float32)}),
        checkpoints.META_ITEM: ocp.args.JsonSave({**meta, "step": 8, "seed": 0}),
    }))
    mgr.wait_until_finished()
    mgr.close()
    return wd, interop.to_torch_state_dict(model), interop.to_torch_state_dict(later)


def _import_and_reexport(out_dir) -> dict:
    pure, meta = checkpoints.load_model_state(out_dir)
    m = models.create(meta["model_name"], rngs=nnx.Rngs(123), **meta["model_kwargs"])
    checkpoints.load_into(out_dir, m)
    return interop.to_torch_state_dict(m)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_cli_round_trip(tiny_workdir, tmp_path, suffix):
    wd, sd3, sd8 = tiny_workdir
    out = tmp_path / f"model{suffix}"
    assert cli_main(["export", "--workdir", str(wd), "--out", str(out), "--step", "3"]) == 0
    # the file loads with strict=True into the PyTorch twin of the official class
    if suffix == ".pth":
        obj = torch.load(out, map_location="cpu", weights_only=True)
        assert list(obj) == ["model"]
        tsd = obj["model"]
    else:
        from safetensors.torch import load_file
        tsd = load_file(str(out))
    tm = interop.torch_model("convmae_tiny", img_size=32)
    tm.load_state_dict(tsd, strict=True)
    assert all(np.array_equal(tsd[k].numpy(), sd3[k]) for k in sd3)
    # import back (model inferred from the tensors) is bit-exact
    imported = tmp_path / "imported"
    assert cli_main(["import", "--torch", str(out), "--out", str(imported)]) == 0
    pure, meta = checkpoints.load_model_state(imported)
    assert meta["model_name"] == "convmae_tiny" and meta["model_kwargs"]["img_size"] == 32
    back = _import_and_reexport(imported)
    assert list(back) == list(sd3)
    assert all(back[k].tobytes() == sd3[k].tobytes() for k in sd3)
    # latest step by default
    latest = tmp_path / f"latest{suffix}"
    assert cli_main(["export", "--workdir", str(wd), "--out", str(latest)]) == 0
    if suffix == ".safetensors":
        from safetensors.numpy import load_file as np_load
        got = np_load(str(latest))
        assert all(np.array_equal(got[k], sd8[k]) for k in sd8)


def test_cli_refuses_overwrite_and_bad_input(tiny_workdir, tmp_path, capsys):
    wd, sd3, _ = tiny_workdir
    out = tmp_path / "m.pth"
    assert cli_main(["export", "--workdir", str(wd), "--out", str(out), "--step", "3"]) == 0
    stamp = out.read_bytes()
    assert cli_main(["export", "--workdir", str(wd), "--out", str(out), "--step", "8"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == stamp
    assert cli_main(["export", "--workdir", str(wd), "--out", str(out), "--step", "8",
                     "--overwrite"]) == 0
    assert out.read_bytes() != stamp
    # unknown suffix and missing workdir/step refused, nothing written
    assert cli_main(["export", "--workdir", str(wd), "--out", str(tmp_path / "m.npz")]) == 2
    assert cli_main(["export", "--workdir", str(wd), "--out", str(tmp_path / "x.pth"),
                     "--step", "99"]) == 2
    assert cli_main(["export", "--workdir", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "y.pth")]) == 2
    assert not (tmp_path / "m.npz").exists() and not (tmp_path / "x.pth").exists()
    assert not (tmp_path / "y.pth").exists()

    # import: a damaged file is refused naming the key, the output folder is not created
    bad = dict(sd3)
    del bad["blocks2.0.conv1.weight"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    torch.save({"model": to_torch_sd(bad)}, tmp_path / "bad.pth")
    dest = tmp_path / "dest"
    capsys.readouterr()
    assert cli_main(["import", "--torch", str(tmp_path / "bad.pth"), "--out", str(dest),
                     "--model", "convmae_tiny", "--img_size", "32"]) == 2
    err = capsys.readouterr().err
    assert "blocks2.0.conv1.weight" in err and "extra.weight" in err
    assert not dest.exists()
    # wrong size for the named model: refused with the key and shapes
    assert cli_main(["import", "--torch", str(out), "--out", str(dest), "--model", "convmae_tiny",
                     "--img_size", "64"]) == 2
    assert "pos_embed" in capsys.readouterr().err and not dest.exists()
    # an unwrapped state dict imports too; a second import needs --overwrite
    torch.save(to_torch_sd(sd3), tmp_path / "plain.pth")
    assert cli_main(["import", "--torch", str(tmp_path / "plain.pth"), "--out", str(dest)]) == 0
    assert cli_main(["import", "--torch", str(tmp_path / "plain.pth"), "--out", str(dest)]) == 2
    assert cli_main(["import", "--torch", str(tmp_path / "plain.pth"), "--out", str(dest),
                     "--overwrite"]) == 0
    back = _import_and_reexport(dest)
    assert all(back[k].tobytes() == sd3[k].tobytes() for k in sd3)


def test_cli_import_pretraining_file_as_classifier(tiny_workdir, tmp_path):
    wd, sd3, _ = tiny_workdir
    pth = tmp_path / "pre.pth"
    assert cli_main(["export", "--workdir", str(wd), "--out", str(pth), "--step", "3"]) == 0
    dest = tmp_path / "clf"
    assert cli_main(["import", "--torch", str(pth), "--out", str(dest), "--model", "convvit_tiny",
                     "--img_size", "32", "--num_classes", "5"]) == 0
    _, meta = checkpoints.load_model_state(dest)
    assert meta["model_name"] == "convvit_tiny" and meta["model_kwargs"]["num_classes"] == 5
    assert set(meta["import_report"]["missing"]) == CLASSIFIER_ONLY
    back = _import_and_reexport(dest)
    assert back["head.weight"].shape == (5, 64)
    for k in ("pos_embed", "blocks3.1.mlp.fc2.weight", "patch_embed1.proj.weight"):
        np.testing.assert_array_equal(back[k], sd3[k])


def test_cli_module_entry_point(tiny_workdir, tmp_path):
    wd, sd3, _ = tiny_workdir
    out = tmp_path / "entry.safetensors"
    res = subprocess.run([sys.executable, "-m", "convmae_jax.interop", "export", "--workdir", str(wd),
                          "--out", str(out), "--step", "3"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    from safetensors.numpy import load_file
    got = load_file(str(out))
    assert set(got) == set(sd3) and all(np.array_equal(got[k], sd3[k]) for k in sd3)


def test_cli_reads_official_style_training_checkpoint(tiny_workdir, tmp_path):
    """Official checkpoints are {"model", "optimizer", "epoch", "args": Namespace}; weights_only works."""
    wd, sd3, _ = tiny_workdir
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": to_torch_sd(sd3), "optimizer": {"state": {}}, "epoch": 399,
                "args": argparse.Namespace(model="convmae_convvit_base_patch16", blr=1.5e-4)}, path)
    dest = tmp_path / "imp"
    assert cli_main(["import", "--torch", str(path), "--out", str(dest)]) == 0
    back = _import_and_reexport(dest)
    assert all(back[k].tobytes() == sd3[k].tobytes() for k in sd3)


def test_infer_model_from_state_dict(base_pretrain):
    _, sd = base_pretrain
    name, kw = infer_model(sd)
    assert name == "convmae_base"
    assert kw["img_size"] == 224 and tuple(kw["embed_dims"]) == (256, 384, 768)
    assert tuple(kw["depths"]) == (2, 2, 11) and kw["decoder_depth"] == 8
    assert kw["decoder_embed_dim"] == 512 and "decoder_mlp_ratio" not in kw
    odd = dict(img_size=48, in_chans=1, mlp_ratios=(4.0, 2.0, 3.0), decoder_mlp_ratio=2.0)
    sd_odd = interop.to_torch_state_dict(models.create("convmae_tiny", rngs=nnx.Rngs(0), **odd))
    name, kw = infer_model(sd_odd)
    assert name == "convmae_tiny"
    assert models.config_for(name, **kw) == models.config_for("convmae_tiny", **odd)
    clf_kw = dict(img_size=32, num_classes=7, global_pool=False)
    sd_clf = interop.to_torch_state_dict(models.create("convvit_tiny", rngs=nnx.Rngs(0), **clf_kw))
    name, kw = infer_model(sd_clf)
    assert name == "convvit_tiny" and kw["num_classes"] == 7 and kw["global_pool"] is False
    assert kw["img_size"] == 32
