"""Zero-shot evaluation (paper Tables 1, 3, 4): captioning, VQA, GQA, video captioning.

    from pipeline.eval import caption_metrics, evaluate_task
    caption_metrics({1: "a dog on a beach"}, {1: ["a dog runs on the beach", ...]})  # CIDEr, BLEU-4, ...
    evaluate_task(model, cfg, "coco_karpathy_test", run_dir / "eval" / "coco_karpathy_test")
    simvlg eval CONFIG --checkpoint DIR --task vqav2_val          # pipeline.eval.run.main(argv)

Rooms: metrics.py (pycocoevalcap with PTB tokenisation, official VQA accuracy, GQA exact match),
tasks.py (the tasks and the files each expects, listed there; their annotations are read by
pipeline/data/formats/annotations.py), media.py (images and videos from folders or shards),
captioning.py / vqa.py / video.py (prompts, generation settings, scoring per task kind), dist.py (rank
split, gather by id on rank 0), gallery.py (HTML gallery, merged-token PNGs), evaluate.py (one task
end to end), run.py (the command, checkpoint loading).
"""

from .dist import gather_by_id, merge_parts, shard_indices
from .evaluate import evaluate_task, predict
from .gallery import merge_figure, merge_overlay, save_merge_figure, write_gallery
from .metrics import MetricError, caption_metrics, gqa_accuracy, normalize_answer, spice_status, vqa_accuracy
from .tasks import TASKS, EvalDataError, Sample, TaskData, load_task

__all__ = [
    "TASKS",
    "EvalDataError",
    "MetricError",
    "Sample",
    "TaskData",
    "caption_metrics",
    "evaluate_task",
    "gather_by_id",
    "gqa_accuracy",
    "load_task",
    "merge_figure",
    "merge_overlay",
    "merge_parts",
    "normalize_answer",
    "predict",
    "save_merge_figure",
    "shard_indices",
    "spice_status",
    "vqa_accuracy",
    "write_gallery",
]
