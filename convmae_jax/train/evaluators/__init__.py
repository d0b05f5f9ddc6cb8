"""Ways of judging a model while it trains, each behind the loop's small ``Evaluator`` interface
(``loop.Evaluator``): built by a job from its config, called by the loop at its own period, writing
its own scalars and outputs.

* ``classification.TopKEvaluator`` -- top-1 / top-5 / loss on a labelled split, best checkpoint kept;
* ``segmentation.SegmentationEvaluator`` -- mIoU / mAcc / aAcc from a confusion matrix over a
  split (sliding-window or whole-image inference), per-class JSON, best checkpoint kept;
* ``best.BestModelEvaluator`` -- what those two share: their period and the best model so far;
* ``reconstruction.ReconstructionFigure`` -- original | masked | reconstruction grids of fixed
  held-out images;
* ``knn.KnnMonitor`` -- weighted k-NN top-1 of the pretraining encoder's unmasked, pooled
  embeddings of fixed class-balanced subsets of a labelled dataset.
"""
