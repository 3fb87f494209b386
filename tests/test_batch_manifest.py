"""The batch job's parts that need no Ray cluster: manifests, validation, the row envelope and its bounded
retries, the results manifest, the summary, the report and `wan-ray validate`."""

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from releases import write_release

from wan_ray.batch.manifest import ManifestError, admit, read_manifest
from wan_ray.batch.progress import estimate, progress_line
from wan_ray.batch.report import Summary, report_html, summary_text
from wan_ray.batch.results import results_table
from wan_ray.cli import main
from wan_ray.models.config import PRESETS
from wan_ray.runtime.actors import StageActor, StageRecipe, actor_for, call_stage, pool_args
from wan_ray.runtime.ledger import Ledger
from wan_ray.runtime.rows import from_batch, to_batch
from wan_ray.runtime.topology import StageSpec
from wan_ray.stages.records import Result

T2V = PRESETS["t2v-A14B"]


def admitted(*rows, task=T2V):
    rows = [{"prompt": "a cat", **row} for row in rows]
    names = list(dict.fromkeys(name for row in rows for name in row))
    return admit(pa.table({name: [row.get(name) for row in rows] for name in names}), task).items


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return str(write_release(tmp_path_factory.mktemp("release") / "t2v", "t2v"))


# ---------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("row,error", [
    ({"size": "100*100"}, r"size 100\*100 is not supported by t2v-A14B; accepted: 1280\*720"),
    ({"frames": 6}, r"frames must be 4n\+1"),
    ({"steps": -2}, "steps must be >= 1, got -2"),
    ({"prompt": "  "}, "prompt must be a non-empty string"),
    ({"prompt": None}, "prompt must be a non-empty string, got None"),
    ({"frames": "17"}, "frames must be an integer, got str '17'"),
    ({"seed": 1.5}, "seed must be an integer, got float 1.5"),
    ({"shift": "high"}, "shift must be a number, got str 'high'"),
    ({"size": 832}, "size must be a string, got int 832"),
    ({"solver": "ddim"}, "solver 'ddim' is not one of"),
    ({"image": "/tmp/x.png"}, "t2v-A14B is text-to-video and takes no image"),
    ({"id": 1.5}, "id must be a string or an integer, got float 1.5"),
])
def test_bad_rows_fail_with_a_clear_message(row, error):
    (item,) = admitted(row)
    assert item.status == "failed" and item.failed_stage == "validate" and item.request is None
    assert re.search(error, item.error), item.error
    assert item.id and re.fullmatch(r"[A-Za-z0-9._-]+", item.key)  # a failed row still has an id and key


def test_good_rows_take_both_size_spellings_and_the_model_defaults():
    a, b, c = admitted({"size": "832*480", "seed": 7}, {"size": "832x480", "frames": 9.0},
                       {"size": None, "seed": float("nan"), "shift": float("nan"), "note": "kept"})
    assert all(item.live for item in (a, b, c))
    assert (a.request.width, a.request.height, a.request.seed) == (832, 480, 7)
    assert (b.request.width, b.request.height, b.request.frames) == (832, 480, 9)
    assert (c.request.width, c.request.height, c.request.shift) == (1280, 720, T2V.sample_shift)
    assert c.extras == {"note": "kept"}  # unknown columns pass through


def test_ids_are_kept_and_keys_are_safe_and_distinct():
    ids = ["../../etc/passwd", "a/b", "a_b", ".hidden", "ünï code:*?", "plain-id_1.2", "7"]
    items = admitted(*[{"id": i} for i in ids])
    assert [item.id for item in items] == ids
    keys = [item.key for item in items]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", key) and not key.startswith(".") and ".." not in key
    assert keys[-2:] == ["plain-id_1.2", "7"]  # safe ids are their own keys
    integers = admit(pa.table({"prompt": ["a", "b"], "id": [7, 8]}), T2V).items
    assert [item.id for item in integers] == ["7", "8"]


def test_rows_without_id_get_a_stable_id_from_their_content():
    first, same, other, again = admitted({"seed": 1}, {"seed": 1}, {"seed": 1, "steps": 3}, {"id": " "})
    assert first.id == same.id and first.id != other.id  # settings beyond prompt and seed count too
    assert admitted({"seed": 1})[0].id == first.id  # stable across runs
    assert again.id.startswith("r")


def test_duplicate_ids_share_one_video_or_fail():
    table = pa.Table.from_pylist([{"id": "x", "prompt": "a cat", "seed": 1},
                                  {"id": "x", "prompt": "a cat", "seed": 1},
                                  {"id": "x", "prompt": "a dog", "seed": 1}])
    admission = admit(table, T2V)
    assert admission.duplicates == {1: 0}
    assert admission.items[2].status == "failed"
    assert "also the id of row 0, with other settings" in admission.items[2].error


def test_a_missing_image_fails_before_any_work(tmp_path):
    i2v = PRESETS["i2v-A14B"]
    (tmp_path / "there.png").write_bytes(b"x")
    ok, missing = admitted({"image": str(tmp_path / "there.png"), "size": "832*480"},
                           {"image": str(tmp_path / "gone.png"), "size": "832*480"}, task=i2v)
    assert ok.live and ok.request.image == str(tmp_path / "there.png")
    assert missing.status == "failed" and "gone.png' does not exist" in missing.error


# ---------------------------------------------------------------------------------------------------------
# Manifest sources


def test_a_manifest_is_a_file_a_folder_or_a_glob(tmp_path):
    folder = tmp_path / "m"
    (folder / "_results").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["a", "b"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"prompt": ["c"], "seed": [3]}), folder / "part-1.parquet")
    pq.write_table(pa.table({"prompt": ["old"]}), folder / "_results" / "results.parquet")  # skipped
    assert read_manifest(str(folder / "part-0.parquet")).num_rows == 2
    whole = read_manifest(str(folder))
    assert sorted(whole["prompt"].to_pylist()) == ["a", "b", "c"]
    assert whole["seed"].to_pylist().count(None) == 2  # missing columns of one file are nulls
    assert read_manifest(str(folder / "part-*.parquet")).num_rows == 3


def test_manifest_level_problems_are_job_errors(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "no-prompt.parquet")
    with pytest.raises(ManifestError, match=r"no 'prompt' column \(it has \['text'\]\); 'prompt' is req"):
        read_manifest(str(tmp_path / "no-prompt.parquet"))
    with pytest.raises(ManifestError, match="no Parquet files at"):
        read_manifest(str(tmp_path / "nothing-here"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match=r"cannot read .*junk.parquet as Parquet"):
        read_manifest(str(tmp_path / "junk.parquet"))


def test_validate_prints_each_problem_and_sets_the_exit_code(tmp_path, release, capsys):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["good", "bad", "worse"], "prompt": ["a cat", "a dog", ""],
                             "frames": [5, 6, 5]}), path)
    assert main(["validate", str(path), "--model", release]) == 1
    out = capsys.readouterr().out
    assert "row 1 (id 'bad'): frames must be 4n+1" in out
    assert "row 2 (id 'worse'): prompt must be a non-empty string" in out
    assert "3 rows: 1 valid, 2 invalid" in out
    pq.write_table(pa.table({"prompt": ["a cat"]}), path)
    assert main(["validate", str(path), "--model", release]) == 0
    pq.write_table(pa.table({"text": ["a cat"]}), path)
    assert main(["validate", str(path), "--model", release]) == 2
    assert "no 'prompt' column" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The row envelope


class Crash(BaseException):
    """Stands in for a worker process dying: nothing in the envelope may catch it."""


class FakeStage:
    def __init__(self, poison):
        self.poison, self.calls = poison, []

    def __call__(self, items):
        self.calls.append([item.id for item in items])
        for item in items:
            if item.id == self.poison:
                raise Crash
        return [item.replace(timings={"fake": 1.0}) for item in items]


def test_rows_survive_the_envelope():
    items = admitted({"id": "a"}, {"id": "b", "frames": 6})
    assert from_batch(to_batch(items)) == items
    assert list(to_batch(items)["status"]) == ["ok", "failed"]


def test_a_row_that_keeps_killing_workers_fails_and_spares_its_neighbours():
    recipe = StageRecipe("denoise_high", "unused", StageSpec())
    ledger, stage = Ledger(), FakeStage(poison="b")
    batch = to_batch(admitted({"id": "a"}, {"id": "b"}, {"id": "c"}))
    for _ in range(2):  # Ray restarts the worker and sends the same batch again
        with pytest.raises(Crash):
            call_stage(stage, recipe, ledger, batch)
    a, b, c = from_batch(call_stage(stage, recipe, ledger, batch))
    assert stage.calls == [["a", "b", "c"], ["a"], ["b"], ["a"], ["c"]]  # after a death: row by row
    assert a.live and c.live and a.timings == {"fake": 1.0}
    assert b.status == "failed" and b.failed_stage == "denoise_high"
    assert b.error == "the denoise_high worker process died 2 times on this row"
    assert ledger.counts() == {"denoise_high": 3} and ledger.in_flight() == {}


def test_the_text_encoder_encodes_each_distinct_text_once_per_job(release):
    actor = StageActor(StageRecipe("text_encode", release, StageSpec()))
    encoded = []
    encode = actor.stage.encoder.encode
    actor.stage.encoder.encode = lambda texts: encoded.extend(texts) or encode(texts)
    rows = admitted({"prompt": "a red cat"}, {"prompt": "a blue dog"}, {"prompt": "a red cat"}, task=T2V)
    out = from_batch(actor(to_batch(rows)))
    assert sorted(encoded) == sorted(["a red cat", "a blue dog", T2V.negative_prompt])  # negative: once
    assert torch_equal(out[0].embeds.context, out[2].embeds.context)
    actor(to_batch(admitted({"prompt": "a blue dog"}, task=T2V)))  # a later batch: all cached
    assert len(encoded) == 3


def test_a_denoise_recipe_builds_its_expert_with_the_topology_attention_backend(release):
    stage = StageRecipe("denoise_high", release, StageSpec(attention="math")).build()
    backends = {m.backend for m in stage.model.modules() if hasattr(m, "backend")}
    assert backends == {"math"}


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_gang_stages_get_a_gang_leader():
    assert actor_for("denoise_high", StageSpec()) is StageActor
    assert actor_for("denoise_low", StageSpec(gang_size=2)) is StageActor  # builds a Gang
    leader = pool_args(StageSpec(gang_size=2, num_gpus=1, num_cpus=4))
    assert leader["num_gpus"] == 0 and leader["num_cpus"] < 1  # the ranks' bundles hold the resources


# ---------------------------------------------------------------------------------------------------------
# Results, summary, report, progress


def results():
    timings = {"text_encode": 0.5, "denoise_high": 2.0, "decode": 1.0, "write": 0.1}
    return [Result("v1", "v1", "ok", "o/v1.mp4", "o/v1.jpg", "o/v1.json", timings=timings, gpu_seconds=3.0),
            Result("<b>x</b>", "x-1", "failed", error="frames must be 4n+1 <odd>", failed_stage="validate"),
            Result("v3", "v3", "skipped", "o/v3.mp4", "o/v3.jpg", "o/v3.json")]


def test_the_results_manifest_has_our_columns_then_the_inputs():
    manifest = pa.table({"id": ["v1", "<b>x</b>", "v3"], "prompt": ["p1", "p2", "p3"],
                         "status": ["draft", "final", "draft"], "score": pa.array([1, None, 3], pa.int32())})
    table = results_table(results(), manifest, ["text_encode", "denoise_high", "decode", "write"])
    assert table.column_names[:8] == ["id", "key", "status", "video_uri", "thumbnail_uri", "sidecar_uri",
                                      "error", "failed_stage"]
    assert table.column_names[8:] == ["time_text_encode", "time_denoise_high", "time_decode", "time_write",
                                      "gpu_seconds", "prompt", "input_status", "score"]
    assert table["status"].to_pylist() == ["ok", "failed", "skipped"]
    assert table["input_status"].to_pylist() == ["draft", "final", "draft"]
    assert table["score"].type == pa.int32() and table["score"].to_pylist() == [1, None, 3]
    assert table["time_denoise_high"].to_pylist() == [2.0, None, None]


def test_summary_and_report():
    stages = ["text_encode", "denoise_high", "decode", "write"]
    summary = Summary(results(), ["p1", None, "p<3>"], stages, 60.0)
    text = summary_text(summary)
    assert text.startswith("3 rows: 1 ok, 1 failed, 1 skipped in 60.0 s (1.0 videos/min)")
    assert re.search(r"denoise_high\s+1\s+2.00\s+2.00", text)
    assert "GPU-seconds per video: 3.00" in text
    assert "failed '<b>x</b>' in validate: frames must be 4n+1 <odd>" in text
    page = report_html(summary)
    assert '<a href="../v1.mp4"><img src="../v1.jpg"' in page and '<img src="../v3.jpg"' in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page  # ids and errors are escaped
    assert "frames must be 4n+1 &lt;odd&gt;" in page and "p&lt;3&gt;" in page
    assert page.count("<rect ") == 4  # one timing bar per stage


def test_progress_line():
    counts = {"text_encode": 16, "denoise_high": 9, "write": 6}
    line = progress_line(counts, ["text_encode", "denoise_high", "write"], 16, 60.0, 100.0)
    assert line == ("[0:01:00] text_encode 16/16 | denoise_high 9/16 | write 6/16 | 6.0 videos/min "
                    "| ETA 0:01:40")
    assert progress_line({}, ["write"], 4, 5.0, None).endswith("0.0 videos/min | ETA --")
    # the pace since the first finished video: 4 more in 20 s, so 6 left take 30 s
    assert estimate((40.0, 2), 60.0, 6, 12) == 30.0
    assert estimate(None, 60.0, 0, 12) is None and estimate((40.0, 2), 50.0, 2, 12) is None
    assert estimate((40.0, 12), 50.0, 12, 12) == 0.0


def test_files_that_disagree_on_a_column_type_are_a_job_error(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "size": ["64*64"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "size": [64]}), tmp_path / "b.parquet")
    with pytest.raises(ManifestError, match=r"disagree on column types \{'size': \['int64', 'string'\]\}"):
        read_manifest(str(tmp_path))


def test_generate_refuses_a_missing_model_before_starting_anything(tmp_path, capsys):
    pq.write_table(pa.table({"prompt": ["a cat"]}), tmp_path / "m.parquet")
    code = main(["generate", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out"), "--model",
                 str(tmp_path / "no-such-model")])
    assert code == 2 and "is neither a bundled model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_stopped_pipeline_is_reported_by_its_root_cause():
    from wan_ray.batch.job import root_cause

    ray_text = ("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker("
                "MapBatches(StageActor)).__init__()\x1b[39m (pid=1)\n  File \"x.py\", line 3, in build\n"
                "RuntimeError: the text_encode stage could not start: OSError: no such file: t5.pth")
    assert root_cause(RuntimeError(ray_text)) == ("RuntimeError: the text_encode stage could not start: "
                                                   "OSError: no such file: t5.pth")
    assert root_cause(ValueError("plain")) == "ValueError: plain"
