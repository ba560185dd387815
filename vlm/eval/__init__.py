"""Evaluation on any dataset: per-sample metrics (:mod:`.metrics`), the scorer that picks them (:mod:`.score`),
reports (:mod:`.report`), ``python -m vlm.eval`` (:mod:`.__main__`) and the lmms-eval model (:mod:`.lmms`)."""
