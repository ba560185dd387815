"""The built-in ``shapes`` dataset: procedurally generated coloured shapes with captions, VQA, grounding, referring
and two-image questions — deterministic per ``(seed, split, index)``, learnable by a tiny model on a CPU.

>>> from vlm.data.shapes import ShapesDataset
>>> ds = ShapesDataset("train", size=1000, tasks={"vqa": 1.0, "grounding": 1.0})
>>> sample = ds[0]                     # vlm.data.sample.Sample, images as PIL, structured answer in sample.meta
>>> ShapesDataset.evaluate(["red"], [ds[0]])
"""
from vlm.data.shapes.dataset import (DEFAULT_SIZES, DEFAULT_TASKS, SPLITS, ShapesDataset, build_shapes, sample_seed,
                                     task_weights)
from vlm.data.shapes.metrics import caption_pairs, evaluate, grounding_iou, normalize_answer, score, score_qa
from vlm.data.shapes.scene import BACKGROUNDS, COLORS, DEFAULT_SHAPES, SHAPES, Scene, SceneConfig, Shape, make_scene
from vlm.data.shapes.tasks import GROUPS, MULTI_TASKS, SINGLE_TASKS, TASKS, describe

__all__ = ["BACKGROUNDS", "COLORS", "DEFAULT_SHAPES", "DEFAULT_SIZES", "DEFAULT_TASKS", "GROUPS", "MULTI_TASKS",
           "SHAPES", "SINGLE_TASKS", "SPLITS", "TASKS", "Scene", "SceneConfig", "Shape", "ShapesDataset",
           "build_shapes", "caption_pairs", "describe", "evaluate", "grounding_iou", "make_scene", "normalize_answer",
           "sample_seed", "score", "score_qa", "task_weights"]
