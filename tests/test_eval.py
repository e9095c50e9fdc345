"""Evaluation: metric code against hand-computed values, pycocoevalcap on small caption sets, the
annotation readers and their errors, a 2-rank split + gather, the gallery and merge figures, and one
task end to end with a stand-in model (anything with generate / merge_info)."""

import json
import os
import shutil
import socket
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import opt_tokenizer, save_opt

from pipeline.config import load_config
from pipeline.data.formats.annotations import (
    AnnotationError,
    read_captions,
    read_gqa,
    read_video_captions,
    read_vqa,
)
from pipeline.eval import caption_metrics, gqa_accuracy, normalize_answer, vqa_accuracy
from pipeline.eval.dist import gather_by_id, merge_parts, shard_indices
from pipeline.eval.evaluate import evaluate_task, predict
from pipeline.eval.gallery import merge_figure, merge_overlay, save_merge_figure, write_gallery
from pipeline.eval.metrics import MetricError, process_punctuation, ptb_tokenize
from pipeline.eval.tasks import EvalDataError, load_task
from pipeline.eval.vqa import pre_question, score_vqa


@pytest.fixture
def java_missing_in_ci():
    pytest.fail(
        "CI=true but no `java` on PATH: pycocoevalcap's METEOR cannot run (.ci/run installs "
        "default-jre-headless; a skip here would hide that the metric went untested)"
    )


def needs_java(test):
    """pycocoevalcap's METEOR runs Java: without it the test skips, except under CI (CI=true, set by
    .ci/run, which installs Java), where it fails loudly."""
    if shutil.which("java") is not None:
        return test
    if os.environ.get("CI") == "true":
        return pytest.mark.usefixtures("java_missing_in_ci")(test)
    return pytest.mark.skip(reason="pycocoevalcap needs Java")(test)


# ------------------------------------------------------------------------------ VQA normalisation
@pytest.mark.parametrize(
    "raw, norm",
    [
        ("two", "2"),
        ("2", "2"),
        ("Two", "2"),
        ("none", "0"),  # number words
        ("a dog", "dog"),
        ("The dog", "dog"),
        ("an apple", "apple"),  # articles
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("hot dog?", "hot dog"),  # punctuation
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats", "what's"),  # contractions
        ("black-and-white", "black and white"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("  tennis\tracket\n", "tennis racket"),
    ],
)
def test_vqa_normalisation_edge_cases(raw, norm):
    assert normalize_answer(raw) == norm


def test_process_punctuation_matches_the_official_rules():
    assert process_punctuation("t-shirt") == "t shirt"  # no space beside: becomes a space
    assert process_punctuation("left - right") == "left  right"  # a space beside: deleted
    assert process_punctuation("10,000 people, maybe") == "10000 people maybe"  # digit comma: all deleted
    assert process_punctuation("end.") == "end" and process_punctuation("2.50") == "2.50"


def test_vqa_accuracy_averages_over_the_ten_leave_one_out_subsets():
    # 2 of 10 annotators said "2": leaving out one of them leaves 1 match (1/3), leaving out any of
    # the 8 others leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6 (not min(2/3, 1) = 0.667)
    assert vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    # 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9;  1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 1 + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("4", ["2"] * 4 + ["3"] * 6) == 0.0
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    # annotators disagree: their answers get the punctuation step ("t-shirt" -> "t shirt"), as the
    # prediction always does; unanimous answers are compared raw (official quirks, kept: the released
    # answers are already normalised), and ground truth never gets the number-word step
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 1.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    with pytest.raises(MetricError):
        vqa_accuracy("yes", [])


def test_score_vqa_overall_and_per_answer_type():
    recs = [
        {"id": 1, "prediction": "yes", "references": ["yes"] * 10, "answer_type": "yes/no"},
        {"id": 2, "prediction": "two", "references": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},
        {"id": 3, "prediction": "cat", "references": ["dog"] * 10, "answer_type": "other"},
    ]
    m = score_vqa(recs)
    assert m["accuracy"] == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert m["accuracy/yes_no"] == 100 and m["accuracy/number"] == pytest.approx(60)
    assert m["accuracy/other"] == 0
    assert [r["accuracy"] for r in recs] == pytest.approx([1, 0.6, 0])


def test_vqa_2017_as_lavis_and_the_2021_revision():
    """LAVIS' copy (2017): prediction always normalised; human answers only get the punctuation step,
    only when they differ, and are never stripped. 2021: answers cleaned, both sides normalised only
    when the annotators disagree, compared lower-cased."""
    assert vqa_accuracy("yes", ["yes "] * 10) == 0.0  # 2017 keeps the annotator's trailing space
    assert vqa_accuracy("yes", ["yes "] * 10, revision="2021") == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0  # 2017: the article goes from the prediction
    assert vqa_accuracy("a dog", ["dog"] * 10, revision="2021") == 0.0  # 2021: unanimous, compared raw
    assert vqa_accuracy("Dog", ["dog"] * 10, revision="2021") == 1.0  # ... lower-cased
    assert vqa_accuracy("2", ["two"] * 5 + ["three"] * 5) == 0.0  # 2017: no digit step on answers
    assert vqa_accuracy("2", ["two"] * 5 + ["three"] * 5, revision="2021") == 1.0
    with pytest.raises(ValueError, match="revision"):
        vqa_accuracy("yes", ["yes"], revision="2019")
    recs = [{"id": 1, "prediction": "a dog", "references": ["dog"] * 10, "vqa_eval": "2021"}]
    notes: list = []
    assert score_vqa(recs, notes)["accuracy"] == 0.0 and "2021 revision" in notes[0]


def test_okvqa_answers_are_lemmatised_and_say_by_what(tmp_path):
    from pipeline.eval.vqa import lemmatizer, record

    apply, which = lemmatizer()
    assert which.startswith("lemmatiser: ")
    assert apply("dogs") == "dog" and apply("running") == "run" and apply("two dogs") == "two dog"
    assert apply("leaves") in ("leaf", "leave")
    (tmp_path / "okvqa").mkdir()
    (tmp_path / "coco" / "images").mkdir(parents=True)
    qs = [{"question_id": 1, "image_id": 100, "question": "What are these?"}]
    anns = [
        {
            "question_id": 1,
            "image_id": 100,
            "answer_type": "other",
            "answers": [{"answer": "dog", "answer_id": k} for k in range(10)],
        }
    ]
    (tmp_path / "okvqa" / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": qs}))
    (tmp_path / "okvqa" / "mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    (tmp_path / "vqav2").mkdir()
    vqa = tmp_path / "vqav2"
    (vqa / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": qs}))
    (vqa / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    cfg = load_config("simvlg_opt2.7b", [f"eval.data_root={tmp_path}"]).eval
    ok = load_task("okvqa_test", cfg, check_media=False).samples[0]
    r = record(ok, "dogs")
    assert (r["prediction"], r["raw_prediction"]) == ("dog", "dogs")
    notes: list = []
    assert score_vqa([r], notes)["accuracy"] == 100.0 and which in notes  # "dogs" scores as "dog"
    plain = record(load_task("vqav2_val", cfg, check_media=False).samples[0], "dogs")
    assert plain["prediction"] == "dogs" and "raw_prediction" not in plain  # only OK-VQA (official)


def test_gqa_exact_match_and_question_cleaning():
    assert gqa_accuracy("The table.", "table") == 1.0
    assert gqa_accuracy("table", "The table") == 0.0  # LAVIS: the answer is not normalised
    assert gqa_accuracy("tables", "table") == 0.0
    assert pre_question("What color is the DOG?!") == "what color is the dog?"


# ------------------------------------------------------------------------------ caption metrics
CAPS = {
    1: "a man riding a wave on top of a surfboard",
    2: "two cats sleeping on a red couch next to a pillow",
    3: "a plate of food with broccoli and rice on a table",
}


@needs_java
def test_caption_metrics_pycocoevalcap():
    refs = {k: [v, v.replace("a ", "the ", 1)] for k, v in CAPS.items()}
    same = caption_metrics(dict(CAPS), refs, spice=False)
    assert same["BLEU-4"] > 0.99 and same["METEOR"] > 0.99 and same["ROUGE-L"] == pytest.approx(1.0)
    assert set(same) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    # PTB tokenisation: case and punctuation do not count
    shouty = {k: v.capitalize().replace(" on ", ", on ") + "." for k, v in CAPS.items()}
    assert caption_metrics(shouty, refs, spice=False) == pytest.approx(same)
    wrong = caption_metrics({1: CAPS[2], 2: CAPS[3], 3: CAPS[1]}, refs, spice=False)
    assert wrong["BLEU-4"] < 0.05 and wrong["CIDEr"] < 0.2 * same["CIDEr"] and wrong["METEOR"] < 0.5
    half = caption_metrics({1: CAPS[1], 2: "", 3: CAPS[1]}, refs, spice=False)  # empty caption scores 0
    assert wrong["CIDEr"] < half["CIDEr"] < same["CIDEr"]
    notes = []
    caption_metrics({1: CAPS[1]}, {1: [CAPS[1]]}, notes=notes)  # spice="auto": skipped offline, said so
    assert not notes or notes[0].startswith("SPICE skipped")
    with pytest.raises(MetricError, match="ids differ"):
        caption_metrics({1: "x", 9: "y"}, {1: ["x"], 2: ["y"]})
    with pytest.raises(MetricError, match="empty prediction set"):
        caption_metrics({}, {})


@needs_java
def test_ptb_tokenize_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {1: ["A dog's toy (red), on the beach.", "Two  cats!"], "x": ["isn't it -- great?"]}
    ref = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    assert ptb_tokenize(caps) == ref


# ----------------------------------------------------------------------------- annotation files
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _image_set(root: Path, n: int = 7) -> list[dict]:
    """n solid-colour images in root/val2014 + a LAVIS coco_karpathy-style list of them."""
    (root / "images" / "val2014").mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(COLORS)
    for i in range(n):
        c = names[i % 3]
        f = f"val2014/COCO_val2014_{100 + i:012d}.jpg"
        arr = np.full((48 + 8 * i, 64, 3), COLORS[c], dtype=np.uint8)
        arr[10:20, 10:30] = 255  # something to merge around
        Image.fromarray(arr).save(root / "images" / f)
        rows.append(
            {
                "image": f,
                "caption": [
                    f"a {c} square on a plain background with a white patch",
                    f"a {c} picture with a small white rectangle",
                ],
            }
        )
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "caps.json").write_text(json.dumps(rows))
    return rows


def _cfg(root: Path, *extra):
    return load_config(
        "demo",
        [
            f"eval.data_root={root}",
            "eval.datasets.tiny.kind=caption",
            "eval.datasets.tiny.annotations=annotations/caps.json",
            "eval.datasets.tiny.images=images",
            "data.num_workers=0",
            "eval.batch_size=3",
            "tracking.enabled=false",
            *extra,
        ],
    )


def test_caption_readers_lavis_list_and_coco_style(tmp_path):
    rows = _image_set(tmp_path, 4)
    samples = read_captions(tmp_path / "annotations" / "caps.json")
    assert [s.id for s in samples] == [100, 101, 102, 103]  # COCO ids from the file names
    assert samples[0].media == rows[0]["image"] and len(samples[0].references) == 2
    coco = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "domain": "in-domain"},
            {"id": 8, "file_name": "b.jpg", "domain": "out-domain"},
        ],
        "annotations": [
            {"image_id": 7, "caption": "x"},
            {"image_id": 8, "caption": "y"},
            {"image_id": 7, "caption": "z"},
        ],
    }
    p = tmp_path / "nocaps.json"
    p.write_text(json.dumps(coco))
    s = read_captions(p)
    assert [(x.id, x.references, x.meta["domain"]) for x in s] == [
        (7, ["x", "z"], "in-domain"),
        (8, ["y"], "out-domain"),
    ]
    coco["annotations"].append({"image_id": 99, "caption": "?"})
    p.write_text(json.dumps(coco))
    with pytest.raises(AnnotationError, match="mismatched ids"):
        read_captions(p)


def test_vqa_gqa_and_video_readers(tmp_path):
    qs = {
        "questions": [
            {"question_id": 1, "image_id": 42, "question": "Is it red?"},
            {"question_id": 2, "image_id": 42, "question": "How many?"},
        ]
    }
    anns = {
        "annotations": [
            {
                "question_id": 1,
                "image_id": 42,
                "answer_type": "yes/no",
                "answers": [{"answer": "yes", "answer_id": i} for i in range(10)],
            },
            {
                "question_id": 2,
                "image_id": 42,
                "answer_type": "number",
                "answers": [{"answer": "2", "answer_id": i} for i in range(10)],
            },
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    s = read_vqa(tmp_path / "q.json", tmp_path / "a.json", "val2014/COCO_val2014_{image_id:012d}.jpg")
    assert s[0].media == "val2014/COCO_val2014_000000000042.jpg" and s[1].references == ["2"] * 10
    anns["annotations"].pop()
    (tmp_path / "a.json").write_text(json.dumps(anns))
    with pytest.raises(AnnotationError, match=r"mismatched ids.*1 questions without annotation"):
        read_vqa(tmp_path / "q.json", tmp_path / "a.json", "{image_id}")
    gqa = {"201": {"imageId": "n1", "question": "q?", "answer": "table"}}
    (tmp_path / "g.json").write_text(json.dumps(gqa))
    g = read_gqa(tmp_path / "g.json", "{image_id}.jpg")
    assert (g[0].id, g[0].media, g[0].references) == ("201", "n1.jpg", ["table"])
    info = {
        "videos": [{"video_id": "video1", "split": "train"}, {"video_id": "video7010", "split": "test"}],
        "sentences": [
            {"video_id": "video1", "caption": "a"},
            {"video_id": "video7010", "caption": "b"},
            {"video_id": "video7010", "caption": "c"},
        ],
    }
    (tmp_path / "msrvtt.json").write_text(json.dumps(info))
    v = read_video_captions(tmp_path / "msrvtt.json")
    assert [(x.id, x.references) for x in v] == [("video7010", ["b", "c"])]
    (tmp_path / "AllVideoDescriptions.txt").write_text("# x\nclipA a man cooks\nclipB a dog\nclipA food\n")
    (tmp_path / "youtube_mapping.txt").write_text("clipA vid1301\nclipB vid5\n")
    m = read_video_captions(tmp_path / "AllVideoDescriptions.txt", mapping=tmp_path / "youtube_mapping.txt")
    assert [(x.id, x.media, x.references) for x in m] == [("vid1301", "clipA", ["a man cooks", "food"])]
    with pytest.raises(AnnotationError, match="youtube_mapping"):
        read_video_captions(tmp_path / "AllVideoDescriptions.txt", mapping=tmp_path / "nope.txt")


def test_clear_one_line_errors(tmp_path):
    _image_set(tmp_path, 3)
    cfg = _cfg(tmp_path)
    with pytest.raises(EvalDataError) as e:
        load_task("coco_karpathy_test", cfg.eval)
    msg = str(e.value)
    assert "\n" not in msg and "annotations file not found" in msg and "coco_karpathy_test.json" in msg
    with pytest.raises(EvalDataError, match="unknown eval task 'cocoo'"):
        load_task("cocoo", cfg.eval)
    (tmp_path / "images" / "val2014" / "COCO_val2014_000000000101.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"1 of 3 images not found .* id 101"):
        load_task("tiny", cfg.eval)
    (tmp_path / "annotations" / "caps.json").write_text('[{"image": 1')
    with pytest.raises(EvalDataError, match="not valid JSON"):
        load_task("tiny", cfg.eval)
    with pytest.raises(EvalDataError, match="unknown key"):
        load_task("tiny", _cfg(tmp_path, "eval.datasets.tiny.imagez=x").eval)


def test_media_from_shards(tmp_path):
    import io
    import tarfile

    rows = _image_set(tmp_path, 3)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, r in enumerate(rows):
            for name, data in [
                (f"{i:05d}.jpg", (tmp_path / "images" / r["image"]).read_bytes()),
                (f"{i:05d}.json", json.dumps({"url": "file:///x/" + r["image"]}).encode()),
            ]:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    shutil.rmtree(tmp_path / "images")
    data = load_task("tiny", _cfg(tmp_path, "eval.datasets.tiny.shards=00000.tar").eval)
    assert data.media.read(rows[2]["image"]) == data.media.read("COCO_val2014_000000000102")


# --------------------------------------------------------------------------------- distributed
def test_merge_parts_detects_double_counting_and_losses():
    assert merge_parts([{1: "a", 3: "c"}, {2: "b"}], [1, 2, 3]) == {1: "a", 2: "b", 3: "c"}
    with pytest.raises(EvalDataError, match="ranks 0 and 1"):
        merge_parts([{1: "a"}, {1: "a", 2: "b"}], [1, 2])
    with pytest.raises(EvalDataError, match="1 ids missing"):
        merge_parts([{1: "a"}, {}], [1, 2])
    with pytest.raises(EvalDataError, match="1 unexpected"):
        merge_parts([{1: "a", 5: "e"}, {2: "b"}], [1, 2])
    with pytest.raises(EvalDataError, match="empty prediction set"):
        merge_parts([{}, {}], [])
    assert shard_indices(7, 0, 2) == [0, 2, 4, 6] and shard_indices(7, 1, 2) == [1, 3, 5]


class ColourCaptioner(torch.nn.Module):
    """Stand-in for SimVLG: captions by dominant colour; merge sources on a 4 x 4 patch grid."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.connector = torch.nn.Linear(2, 2)
        self.layers = layers
        self.prompts: list = []

    def generate(self, pixel_values, prompt=None, num_beams=5, max_new_tokens=30, min_new_tokens=8, **kw):
        self.prompts += list(prompt)
        self.kwargs = kw | {"num_beams": num_beams, "max_new_tokens": max_new_tokens}
        names = list(COLORS)
        if pixel_values.dim() == 5:  # video [B, T, 3, H, W]
            self.frames = pixel_values.shape[1]
            pixel_values = pixel_values.float().mean(1)
        # uint8 pixels as the loader delivers them: the dominant channel has the largest mean
        colours = [names[int(px.float().mean(dim=(1, 2)).argmax())] for px in pixel_values]
        return [
            f"{c.capitalize()}.\nQuestion: more"
            if q.startswith("Question:")
            else f" a {c} square on a plain background with a white patch\nignored line"
            for c, q in zip(colours, prompt)
        ]

    def merge_info(self, pixel_values, layers=None):
        B = pixel_values.shape[0]
        base = torch.arange(16)
        return {
            i: (base // (2 ** (i + 1))).reshape(1, 4, 4).expand(B, 4, 4).clone() for i in range(self.layers)
        }


def _gather_worker(rank, world, port, root, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = _cfg(Path(root))
        data = load_task("tiny", cfg.eval)
        local = predict(ColourCaptioner(), data, cfg, rank=rank, world_size=world)
        merged = gather_by_id(local, data.ids)
        if rank == 0:
            Path(out).write_text(json.dumps({"merged": {str(k): v for k, v in merged.items()}}))
        else:
            assert merged is None
        # a rank that failed reports it instead of leaving rank 0 waiting
        try:
            gather_by_id({}, data.ids, error="boom" if rank == 1 else None)
        except EvalDataError as e:
            Path(f"{out}.err{rank}").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_two_rank_split_and_gather(tmp_path):
    import torch.multiprocessing as mp

    rows = _image_set(tmp_path, 7)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "gathered.json"
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path), str(out)), nprocs=2, join=True)
    merged = json.loads(out.read_text())["merged"]
    assert sorted(map(int, merged)) == list(range(100, 107))  # all 7, once each
    for i, r in enumerate(rows):
        assert merged[str(100 + i)] == r["caption"][0]  # right prediction for each id, cleaned
    assert (tmp_path / "gathered.json.err0").read_text() == "rank 1: boom"
    assert (tmp_path / "gathered.json.err1").read_text() == "boom"


# ------------------------------------------------------------------------- gallery and figures
def test_merge_visualisation_and_gallery_files(tmp_path):
    from skimage import data as skdata

    img = skdata.astronaut()[::4, ::4]  # 128 x 128 real photo
    grid = torch.arange(64).reshape(8, 8) // 4  # 16 tokens of 4 horizontally adjacent patches
    mean = merge_overlay(img, grid)  # upscaled to 256 px: 32 px patches, a token is 128 x 32 px
    pal = merge_overlay(img, grid.flatten(), style="palette")  # flat [num_patches] works too
    assert mean.size == pal.size == (256, 256)
    arr = np.asarray(mean)
    assert (arr[40, 2] == arr[40, 120]).all()  # same token: its mean colour
    assert not (arr[40, 120] == arr[40, 140]).all()  # the next token
    assert (arr[40, 127] == 255).all() and (arr[31, 20] == 255).all()  # borders between tokens
    path = save_merge_figure(img, {0: grid, 5: grid // 4}, tmp_path / "merge" / "x.png")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 3 * 256
    with pytest.raises(ValueError, match="square grid"):
        merge_overlay(img, torch.zeros(10, dtype=torch.long))
    html = write_gallery(
        [
            {
                "id": 1,
                "image": torch.from_numpy(img).permute(2, 0, 1),
                "prediction": "a <b>",
                "references": ["ref & more"],
                "question": "q?",
                "figures": [("merge", merge_figure(img, {1: grid}))],
            }
        ],
        tmp_path / "g.html",
        title="t",
        notes=["SPICE skipped"],
    ).read_text()
    assert "a &lt;b&gt;" in html and "ref &amp; more" in html and html.count("data:image/") == 2


# ---------------------------------------------------------------------------------- end to end
@needs_java
def test_evaluate_task_end_to_end(tmp_path):
    _image_set(tmp_path, 7)
    cfg = _cfg(tmp_path, "eval.visualize_layers=[0,2,9]", "eval.visualize_count=2", "eval.gallery_size=4")
    model = ColourCaptioner()
    logged = []
    tracker = types.SimpleNamespace(
        log=lambda step, m: logged.append((step, m)),
        artifact=lambda p, folder=None: logged.append((folder, Path(p).name)),
    )
    rep = evaluate_task(model, cfg, "tiny", tmp_path / "out", tracker=tracker, step=12, checkpoint="ck")
    out = tmp_path / "out"
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["id"] for p in preds] == list(range(100, 107))
    assert preds[1]["prediction"] == "a green square on a plain background with a white patch"
    assert preds[1]["references"][1] == "a green picture with a small white rectangle"
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"]["BLEU-4"] > 99 and m["num_samples"] == 7 and not m["partial"]
    assert any("layers [9] do not exist" in n for n in m["notes"])
    assert set(model.prompts) == {"a photo of"} and len(model.prompts) == 7
    pngs = sorted((out / "merge").glob("*.png"))
    assert [p.name for p in pngs] == ["100.png", "101.png"]
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
    assert (out / "gallery.html").read_text().count("<div class='item'>") == 4
    assert logged[0][0] == 12 and logged[0][1]["eval/tiny/CIDEr"] == rep["metrics"]["CIDEr"]
    assert ("eval/tiny", "predictions.json") in logged and ("eval/tiny/merge", "100.png") in logged
    # a partial run says so
    rep = evaluate_task(
        model, _cfg(tmp_path, "eval.max_samples=2", "eval.gallery_size=0"), "tiny", tmp_path / "out2"
    )
    assert rep["partial"] and rep["num_samples"] == 2 and "partial result" in rep["notes"][0]


@needs_java
def test_vqa_and_video_tasks_from_their_default_files(tmp_path):
    from pipeline.data.video import encode_video

    rows = _image_set(tmp_path / "coco", 3)  # coco/images/val2014/COCO_val2014_000000000100.jpg, ...
    colours = [r["caption"][0].split()[1] for r in rows]
    (tmp_path / "vqav2").mkdir()
    qs = [
        {"question_id": 10 + i, "image_id": 100 + i, "question": "What colour is the SQUARE?"}
        for i in range(3)
    ]
    anns = [
        {
            "question_id": 10 + i,
            "image_id": 100 + i,
            "answer_type": "other",
            "answers": [{"answer": c if k < 9 else "pink", "answer_id": k} for k in range(10)],
        }
        for i, c in enumerate(colours)
    ]
    vqa = tmp_path / "vqav2"
    (vqa / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": qs}))
    (vqa / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    cfg = _cfg(tmp_path, "eval.gallery_size=2", "eval.visualize_count=1", "data.num_frames=4")
    model = ColourCaptioner()
    rep = evaluate_task(model, cfg, "vqav2_val", tmp_path / "vqa")
    assert rep["metrics"] == {"accuracy": 100.0, "accuracy/other": 100.0}
    assert model.prompts[0] == "Question: what colour is the square? Short answer:"
    assert model.kwargs == {
        "num_beams": 3,
        "max_new_tokens": 10,
        "length_penalty": 0.0,
        "repetition_penalty": 1.0,
    }
    assert "VQA accuracy: the LAVIS copy of the 2017 VQA evaluation script" in rep["notes"]
    preds = json.loads((tmp_path / "vqa" / "predictions.json").read_text())
    assert preds[0]["prediction"] == "Red." and preds[0]["accuracy"] == 1.0 and preds[0]["question"]
    (tmp_path / "msrvtt" / "videos").mkdir(parents=True)
    info = {"videos": [], "sentences": []}
    for i, c in enumerate(COLORS):
        vid = f"video{7010 + i}"
        encode_video(
            [np.full((40, 48, 3), COLORS[c], np.uint8)] * 6,
            str(tmp_path / "msrvtt" / "videos" / f"{vid}.mp4"),
        )
        info["videos"].append({"video_id": vid, "split": "test"})
        info["sentences"].append(
            {"video_id": vid, "caption": f"a {c} square on a plain background with a white patch"}
        )
    info["videos"].append({"video_id": "video1", "split": "train"})  # not in the test split
    (tmp_path / "msrvtt" / "test_videodatainfo.json").write_text(json.dumps(info))
    rep = evaluate_task(model, cfg, "msrvtt_test", tmp_path / "video")
    assert model.frames == 4 and rep["num_samples"] == 3 and rep["metrics"]["BLEU-4"] > 99
    assert rep["generation"]["max_new_tokens"] == 20 and rep["generation"]["min_new_tokens"] == 5
    assert (tmp_path / "video" / "gallery.html").read_text().count("<div class='item'>") == 2


def test_model_returning_too_few_texts_fails_clearly(tmp_path):
    _image_set(tmp_path, 3)
    model = ColourCaptioner()
    model.generate = lambda pixel_values, **kw: []
    with pytest.raises(EvalDataError, match="returned 0 texts for 3 inputs"):
        evaluate_task(model, _cfg(tmp_path), "tiny", tmp_path / "out")
    (tmp_path / "images" / "val2014" / "COCO_val2014_000000000101.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(EvalDataError, match=r"^tiny: cannot read .*000000000101.jpg' \(id 101\)"):
        evaluate_task(ColourCaptioner(), _cfg(tmp_path), "tiny", tmp_path / "out")


# ------------------------------------------------------------------------- command and checkpoints
def _connector_folder(path: Path, model) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.connector.state_dict().items()}, str(path / "model.safetensors")
    )
    (path / "config.json").write_text(json.dumps({"format": "simvlg-connector", "connector": "tomeformer"}))
    return path


@needs_java
def test_run_main_writes_report_and_fails_in_one_line(tmp_path, capsys):
    from pipeline.eval.run import add_arguments, load_checkpoint, run

    _image_set(tmp_path, 3)
    model = ColourCaptioner()
    loaded = []
    model.load_connector = lambda p: loaded.append(Path(p))
    ck = _connector_folder(tmp_path / "connector", model)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["demo", "--checkpoint", str(ck), "--run-dir", str(tmp_path / "run")] + sum(
        (
            ["--set", s]
            for s in [
                f"eval.data_root={tmp_path}",
                "eval.datasets.tiny.kind=caption",
                "eval.datasets.tiny.annotations=annotations/caps.json",
                "eval.datasets.tiny.images=images",
                "data.num_workers=0",
                "tracking.enabled=false",
                "eval.gallery_size=2",
            ]
        ),
        [],
    )
    assert run(parser.parse_args(base + ["--task", "tiny"]), model=model) == 0
    assert loaded == [ck]
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["tiny"]["num_samples"] == 3 and report["tiny"]["metrics"]["ROUGE-L"] > 99
    capsys.readouterr()
    assert run(parser.parse_args(base + ["--task", "coco_karpathy_test"]), model=model) == 1
    err = capsys.readouterr().err
    assert err.startswith("simvlg eval: error: coco_karpathy_test: annotations file not found")
    assert err.count("\n") == 1
    # a training checkpoint folder: connector.* weights out of the DeepSpeed model states
    step = tmp_path / "run" / "checkpoints" / "step_00000040"
    (step / "ds").mkdir(parents=True)
    w = {
        "connector.weight": torch.full((2, 2), 3.0, dtype=torch.bfloat16),
        "connector.bias": torch.zeros(2, dtype=torch.bfloat16),
    }
    torch.save({"module": w, "global_steps": 40}, step / "ds" / "mp_rank_00_model_states.pt")
    files = {str(p.relative_to(step)): p.stat().st_size for p in step.rglob("*") if p.is_file()}
    (step / "COMPLETE.json").write_text(json.dumps({"step": 40, "world_size": 1, "files": files}))
    info = load_checkpoint(model, tmp_path / "run")  # a run dir: its newest complete checkpoint
    assert info["step"] == 40 and info["kind"] == "training"
    assert model.connector.weight.dtype == torch.float32 and (model.connector.weight == 3).all()
    from pipeline.eval.run import CheckpointError

    with pytest.raises(CheckpointError, match="not a connector folder"):
        load_checkpoint(model, tmp_path / "annotations")


# ------------------------------------------------------------------- with a real (tiny) SimVLG
def _tiny_backbones(root: Path) -> None:
    """HF ViT (64 px, patch 8: 64 patches + CLS, as the demo), 6-layer BERT, OPT + a BPE tokenizer."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTConfig(
        image_size=64,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
    )
    ViTModel(vit, add_pooling_layer=False).save_pretrained(root / "vit")
    BertModel(
        BertConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=160,
        )
    ).save_pretrained(root / "bert")
    tok = opt_tokenizer([r for c in COLORS for r in (f"a {c} square on a plain background", "\n")] * 4)
    save_opt(root / "opt", tok)


@pytest.mark.slow
@needs_java
def test_simvlg_eval_command_with_a_real_tiny_model(tmp_path):
    """`simvlg eval` as users run it: the model built from the config, the connector folder loaded,
    SimVLG.generate and merge_info for real (random weights: the numbers mean nothing)."""
    from pipeline.eval.run import main
    from pipeline.models import build_model

    _tiny_backbones(tmp_path)
    _image_set(tmp_path, 5)
    sets = [
        f"model.vision.name={tmp_path / 'vit'}",
        "model.vision.loader=hf",
        "model.vision.precision=fp32",
        "model.vision.arch_config=null",
        "model.vision.checkpoint=null",
        f"model.tomeformer.init={tmp_path / 'bert'}",
        f"model.llm.name={tmp_path / 'opt'}",
        "model.llm.precision=fp32",
        f"eval.data_root={tmp_path}",
        "eval.datasets.tiny.kind=caption",
        "eval.datasets.tiny.annotations=annotations/caps.json",
        "eval.datasets.tiny.images=images",
        "data.num_workers=0",
        "eval.num_beams=2",
        "eval.max_new_tokens=6",
        "eval.min_new_tokens=2",
        "eval.visualize_count=2",
        "eval.gallery_size=3",
        f"tracking.uri=sqlite:///{tmp_path / 'ml.db'}",
    ]
    cfg = load_config("demo", sets)
    ck = build_model(cfg.model).save_connector(tmp_path / "connector")
    argv = ["demo", "--checkpoint", str(ck), "--task", "tiny", "--run-dir", str(tmp_path / "run")]
    assert main(argv + sum((["--set", s] for s in sets), [])) == 0
    out = tmp_path / "run" / "eval" / "tiny"
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 5 and all(isinstance(p["prediction"], str) for p in preds)
    assert sorted(p.name for p in (out / "merge").glob("*.png")) == ["100.png", "101.png"]
    m = json.loads((out / "metrics.json").read_text())
    assert {"CIDEr", "BLEU-4", "METEOR", "ROUGE-L"} <= set(m["metrics"])
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}")
    run = client.search_runs([client.get_experiment_by_name("simvlg-demo").experiment_id])[0]
    assert run.info.run_name == "demo-eval" and "eval/tiny/CIDEr" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval/tiny")}
    assert {"eval/tiny/predictions.json", "eval/tiny/metrics.json", "eval/tiny/gallery.html"} <= logged
