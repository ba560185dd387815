"""Overrides that shrink a recipe's run to a few steps for tests (no checkpoints between steps, a small evaluation)."""


def short_run(stages: list[str], steps: int = 2, eval_limit: int = 2, max_new_tokens: int = 4,
              eval_batch_size: int = 2) -> list[str]:
    """``python -m vlm.train`` overrides: ``steps`` optimizer steps of 4 samples (2 per micro-batch) per stage in
    ``stages``, no periodic saves or evaluations, the final evaluation on ``eval_limit`` samples."""
    out = ["trainer.num_workers=0", "trainer.progress=false", f"eval.limit={eval_limit}",
           f"eval.max_new_tokens={max_new_tokens}", f"eval.batch_size={eval_batch_size}"]
    for s in stages:
        out += [f"stage.{s}.max_steps={steps}", f"stage.{s}.global_batch_size=4", f"stage.{s}.micro_batch_size=2",
                f"stage.{s}.save_every=null", f"stage.{s}.eval_every=null"]
    return out
