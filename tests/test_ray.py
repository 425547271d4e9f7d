"""The Ray engine on a local 2-CPU Ray: same results as a local run, killed replicas and
drivers lose and duplicate nothing, bad items stay rows, clear errors.

One Ray is started for the whole module (Ray's start-up is the slow part on 2 cores) and
always shut down. Missing ray skips these tests on a developer machine and fails them when
``CI=true`` (``make test`` installs it from requirements/dev.txt).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kit import cli
from kit.errors import CompkitError, ValidationError
from kit.run import CandidateManifest
from kit.stages.candidates import run_candidates
from kit.stages.freeze import freeze_baseline
from kit.store import OutputStore
from kit.study import load_study

if importlib.util.find_spec("ray") is None:
    message = "ray is not installed (pip install 'compkit[ray]'; make test installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

WORDS = [
    "please",
    "check",
    "where",
    "my",
    "parcel",
    "went",
    "and",
    "tell",
    "me",
    "when",
    "it",
    "will",
    "arrive",
]
#: prompts of very different lengths, so that interleaving by length matters
ITEMS = (
    [
        {
            "id": f"c{i:02d}",
            "task": "classification",
            "input": " ".join(WORDS[: 2 + (i * 7) % len(WORDS)] * (1 + i % 3)),
            "label": ["order_status", "refund", "cancel_order"][i % 3],
        }
        for i in range(14)
    ]
    + [
        {
            "id": f"g{i}",
            "task": "generation",
            "input": " ".join(WORDS[: 3 + i]),
            "reference": "Your order is on the way.",
        }
        for i in range(2)
    ]
    + [  # decoded under its JSON schema, with the task's own token limit (on Ray as well)
        {
            "id": f"x{i}",
            "task": "extraction",
            "input": " ".join(WORDS[: 4 + i]),
            "fields": {"order_id": "A1", "city": None},
        }
        for i in range(2)
    ]
)
#: the columns a run's results are judged on (timings and timestamps differ run to run)
RESULT = [
    "model",
    "seed",
    "output",
    "prompt_tokens",
    "output_tokens",
    "finish_reason",
    "batch_size",
    "token_logprobs",
    "choice_logprobs",
    "choice_n_tokens",
    "choice_probs",
    "choice_pred",
    "error",
    "error_class",
]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs, bound to 127.0.0.1) for the module; shut down after it."""
    from kit.execute_ray import import_ray

    ray = import_ray(local=True)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def make_study(
    folder: Path,
    model: Path,
    *,
    items=ITEMS,
    temperature: float = 0.0,
    repeats: int = 1,
    batch_size: int = 3,
    candidate: dict | None = None,
    execution: dict | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (folder / "prompt.jinja").write_text(
        "{% if labels %}Intents: {{ labels | join(', ') }}. {% endif %}{{ input }}"
    )
    study = {
        "name": "rays",
        "eval_set": {"path": "eval.jsonl"},
        "prompt": {"template": "prompt.jinja"},
        "sampling": {"temperature": temperature, "top_p": 0.95, "max_new_tokens": 6, "seed": 7},
        "repeats": repeats,
        "tasks": {"extraction": {"structured_output": "json_schema", "max_new_tokens": 12}},
        "baseline": {"name": "base", "runtime": "transformers", "model": str(model)},
        "candidates": [
            candidate
            or {
                "name": "half",
                "runtime": "transformers",
                "model": str(model),
                "recipe": "bf16",
                "batch_size": batch_size,
            }
        ],
    }
    if execution is not None:
        study["execution"] = execution
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder / "study.yaml"


def frozen(tmp_path: Path, model: Path, **kwargs) -> Path:
    out = tmp_path / "runs" / "r"
    freeze_baseline(make_study(tmp_path / "study", model, **kwargs), out, progress=False)
    return out


def results(out: Path, model: str) -> pd.DataFrame:
    rows = pd.read_parquet(out / "outputs" / model)
    return rows.set_index(["item_id", "repeat"]).sort_index()[RESULT]


def replica_pids(*, since: float) -> list[int]:
    """Processes of Ray replicas started after ``since`` (their title: ``ray::ShardReplica``)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::ShardReplica") and proc.info["create_time"] >= since:
            pids.append(proc.info["pid"])
    return pids


def wait_for_parts(store: Path, n: int, *, timeout_s: float = 180) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(list(store.glob("part-*.parquet"))) >= n:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("temperature", "repeats"), [(0.0, 1), (0.9, 2)], ids=["greedy", "sampled"]
)
def test_sharded_run_gives_the_local_run_s_results(
    local_ray, tmp_path, tiny_model_dir, temperature, repeats, capsys
):
    out = frozen(tmp_path, tiny_model_dir, temperature=temperature, repeats=repeats)
    run_candidates(out, progress=False)
    local = results(out, "half")
    local_manifest = CandidateManifest.load(out / "candidates" / "half.json")
    assert local_manifest.execution == {"engine": "local"}
    code = cli.main(
        ["candidates", "--out", str(out), "--ray", "--workers", "2", "--force", "--quiet"]
    )
    assert code == 0, capsys.readouterr().err
    sharded = results(out, "half")
    assert len(sharded) == len(ITEMS) * repeats
    # same bytes out, same seeds, same choice scores, same batches as the local run
    pd.testing.assert_frame_equal(sharded, local)
    assert all(text.startswith("{") for text in sharded.loc[["x0", "x1"], "output"])  # schema
    if temperature:  # really sampled: one seed per repeat, and the repeats differ somewhere
        assert sharded["seed"].nunique() == repeats
        by_repeat = sharded["output"].unstack("repeat")
        assert (by_repeat[0] != by_repeat[1]).any()
    cm = CandidateManifest.load(out / "candidates" / "half.json")
    assert cm.execution["engine"] == "ray" and cm.execution["workers"] == 2
    replicas = cm.execution["replicas"]
    # no replica failed, replica 0 (which saves the files) loaded, and every batch of the local
    # run ran exactly once; how many each replica took depends on which one loaded first (a
    # free replica takes the next batch, so on a busy machine the first one loaded can run all
    # six before the other has loaded): that batches are spread over loaded replicas is
    # checked without Ray's timing in test_free_replicas_share_the_batches
    assert len(replicas) == 2 and not any(r["error"] for r in replicas), replicas
    assert replicas[0]["node"] is not None, replicas
    assert sum(r["batches"] for r in replicas) == math.ceil(len(ITEMS) * repeats / 3), replicas
    assert cm.footprint == local_manifest.footprint  # replica 0 saved the bf16 folder
    assert (out / "models" / "half" / "config.json").is_file()
    OutputStore(out / "outputs" / "half").verify()  # marked complete by the driver, parts intact
    assert not (out / "outputs" / "half" / ".ray-run.json").exists()


def test_free_replicas_share_the_batches():
    """The driver's schedule: every loaded replica holds IN_FLIGHT batches, longest first, and
    the next batch goes to whichever replica finished one; a replica still loading gets none."""
    from kit.execute_ray import IN_FLIGHT, _Replica, _Schedule

    class Actor:  # records what the driver sent; ray.remote refs are opaque handles
        def __init__(self) -> None:
            self.sent: list[list[tuple[str, int]]] = []
            self.run_batch = self

        def remote(self, batch):
            self.sent.append(batch)
            return object()

    batches = [[(f"c{i:02d}", 0)] for i in range(7)]  # longest prompts first
    fast, slow, loading = (_Replica(rank, Actor()) for rank in range(3))
    fast.info, slow.info = {}, {}
    sched = _Schedule([fast, slow, loading], queue=deque(batches))
    sched.feed()
    assert [a.actor.sent for a in (fast, slow, loading)] == [batches[:2], batches[2:4], []]
    assert IN_FLIGHT == 2 and fast.in_flight == slow.in_flight == IN_FLIGHT
    done = next(ref for ref, (r, _) in sched.waiting.items() if r is slow)
    sched.waiting.pop(done)
    slow.in_flight -= 1
    sched.feed()  # the replica that finished takes the next batch; the busy one waits
    assert slow.actor.sent[-1] == batches[4] and len(fast.actor.sent) == 2
    loading.info = {}  # loaded late: it takes what is left
    sched.feed()
    assert loading.actor.sent == batches[5:7] and not sched.queue


def test_a_killed_replica_loses_and_duplicates_nothing(local_ray, tmp_path, tiny_model_dir):
    out = frozen(tmp_path, tiny_model_dir, repeats=3, batch_size=1)
    store = out / "outputs" / "half"
    killed: list[int] = []
    started = time.time() - 1

    def kill_one_replica_mid_run() -> None:
        if wait_for_parts(store, 3):
            pids = replica_pids(since=started)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    killer = threading.Thread(target=kill_one_replica_mid_run, daemon=True)
    killer.start()
    summary = run_candidates(out, progress=False, ray=True, workers=2)
    killer.join(timeout=10)
    assert killed, "no replica was killed"
    rows = pd.read_parquet(store)
    expected = {(it["id"], r) for it in ITEMS for r in range(3)}
    assert len(rows) == len(expected) == int(summary.loc[0, "rows"])
    assert not rows.duplicated(["item_id", "repeat"]).any()
    assert set(zip(rows["item_id"], rows["repeat"], strict=True)) == expected
    cm = CandidateManifest.load(out / "candidates" / "half.json")
    errors = [r["error"] for r in cm.execution["replicas"] if r["error"]]
    assert len(errors) == 1 and "died" in errors[0].lower(), cm.execution["replicas"]
    # rerunning finds the candidate complete and changes nothing
    parts = sorted(p.name for p in store.glob("part-*.parquet"))
    run_candidates(out, progress=False, ray=True, workers=2)
    assert sorted(p.name for p in store.glob("part-*.parquet")) == parts


def test_a_killed_driver_resumes_by_rerunning(local_ray, tmp_path, tiny_model_dir):
    out = frozen(tmp_path, tiny_model_dir, repeats=4, batch_size=1)
    store = out / "outputs" / "half"
    address = local_ray.get_runtime_context().gcs_address
    code = (
        "import sys; from kit.stages.candidates import run_candidates; "
        "run_candidates(sys.argv[1], progress=False, ray=sys.argv[2], workers=2)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out), address],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        assert wait_for_parts(store, 3), "the driver stored nothing"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    before = pd.read_parquet(store)
    expected = {(it["id"], r) for it in ITEMS for r in range(4)}
    assert 0 < len(before) < len(expected), "killed too late to test resume"
    assert not OutputStore(store).is_complete()
    run_candidates(out, progress=False, ray=True, workers=2)
    after = pd.read_parquet(store)
    assert len(after) == len(expected) and not after.duplicated(["item_id", "repeat"]).any()
    assert set(zip(after["item_id"], after["repeat"], strict=True)) == expected
    kept = before.set_index(["item_id", "repeat"])["created_at"]
    assert (after.set_index(["item_id", "repeat"]).loc[kept.index, "created_at"] == kept).all()


def test_a_bad_item_becomes_an_error_row_and_the_run_goes_on(local_ray, tmp_path, tiny_model_dir):
    # the tiny GPT-2 holds 256 positions: this prompt makes the model raise on its batch
    long = {"id": "long", "task": "classification", "input": "parcel " * 400, "label": "refund"}
    items = [*ITEMS, long]
    study = make_study(tmp_path / "study", tiny_model_dir, items=items, batch_size=2)
    # the baseline's answers were made elsewhere (a predictions file), so it can freeze
    preds = tmp_path / "study" / "base.jsonl"
    preds.write_text(
        "".join(json.dumps({"id": it["id"], "output": "refund"}) + "\n" for it in items)
    )
    data = yaml.safe_load(study.read_text())
    data["baseline"] = {"name": "base", "runtime": "predictions", "model": str(preds)}
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "runs" / "r"
    freeze_baseline(study, out, progress=False)
    run_candidates(out, progress=False, ray=True, workers=2)
    sharded = results(out, "half")
    assert len(sharded) == len(ITEMS) + 1
    bad = sharded.loc[("long", 0)]
    assert bad["error_class"] == "runtime_error" and "IndexError" in bad["error"]
    assert sharded.drop(index=("long", 0))["error"].isna().all()
    assert CandidateManifest.load(out / "candidates" / "half.json").errors == 1


def test_replicas_that_cannot_open_the_model_stop_the_run_with_their_reason(
    local_ray, tmp_path, tiny_model_dir
):
    gone = tmp_path / "moved-away"
    out = frozen(
        tmp_path,
        tiny_model_dir,
        candidate={"name": "gone", "runtime": "transformers", "model": str(gone)},
    )
    with pytest.raises(CompkitError, match=r"every Ray replica stopped(.|\n)*moved-away") as err:
        run_candidates(out, progress=False, ray=True, workers=2)
    assert f"0 of {len(ITEMS)} rows are stored" in str(err.value)
    assert "replica 0:" in str(err.value) and "replica 1:" in str(err.value)
    assert not (out / "outputs" / "gone" / "_COMPLETE.json").exists()


def test_a_replica_that_does_not_fit_the_cluster_is_refused_at_once(
    local_ray, tmp_path, tiny_model_dir
):
    out = frozen(
        tmp_path, tiny_model_dir, execution={"engine": "ray", "resources": {"num_gpus": 1}}
    )
    t0 = time.monotonic()
    with pytest.raises(CompkitError, match="cannot hold one replica of 1 CPU \\+ 1 GPU"):
        run_candidates(out, progress=False)
    assert time.monotonic() - t0 < 30


# --------------------------------------------------------------------------- no cluster


def test_execution_key_is_validated_naming_the_key(tmp_path, tiny_model_dir):
    bad = make_study(
        tmp_path,
        tiny_model_dir,
        execution={"engine": "rey", "workers": 0, "resources": {"num_gpu": 1}},
    )
    with pytest.raises(ValidationError) as err:
        load_study(bad)
    text = str(err.value)
    assert "field 'execution.engine': unknown engine 'rey' (did you mean 'ray'?)" in text
    assert "field 'execution.workers'" in text
    assert "field 'execution.resources.num_gpu': unknown key" in text


def test_validate_reports_an_unreachable_ray_address(tmp_path, tiny_model_dir, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    study = make_study(
        tmp_path, tiny_model_dir, execution={"engine": "ray", "address": f"127.0.0.1:{port}"}
    )
    t0 = time.monotonic()
    assert cli.main(["validate", str(study)]) == 2
    err = capsys.readouterr().err
    assert f"execution.address '127.0.0.1:{port}': the Ray cluster is unreachable" in err
    assert time.monotonic() - t0 < 30


def test_validate_describes_a_local_ray(tmp_path, tiny_model_dir, capsys):
    study = make_study(
        tmp_path, tiny_model_dir, execution={"engine": "ray", "resources": {"num_cpus": 1}}
    )
    assert cli.main(["validate", str(study)]) == 0
    assert "execution: ray: 2 replica(s) of 1 CPU on a local Ray on this machine" in (
        capsys.readouterr().out
    )


def test_import_kit_and_a_local_run_never_import_ray(tmp_path, tiny_model_dir):
    out = frozen(tmp_path, tiny_model_dir)
    code = (
        "import sys, kit, kit.cli, kit.engines, kit.validate\n"
        "from kit.stages.candidates import run_candidates\n"
        "run_candidates(sys.argv[1], progress=False)\n"
        "assert kit.cli.main(['validate', sys.argv[2]]) == 0\n"
        "print('ray imported' if 'ray' in sys.modules else 'no ray')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "study" / "study.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "no ray"
