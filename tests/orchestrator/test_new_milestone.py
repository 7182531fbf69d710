"""Adding a milestone is one YAML file: written into a copy of conf/, with no other edit, it is
listed, composes, and runs end to end on the CPU (Hydra, Ray, the benchmark, MLflow).

Run: python -m pytest tests/orchestrator/test_new_milestone.py -q
"""

from __future__ import annotations

import io
import shutil

from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from orchestrator.config import CONF_DIR, available_milestones, load_sweep
from orchestrator.sweep import execute
from test_tracking import children, parents

# what a newcomer writes: its command, what differs from the defaults, thresholds and a grid
NEW_MILESTONE = """\
# @package _global_

# python -m orchestrator +milestone=tiny-new
# A milestone added as one file: the tiny model at 64 positions, 16-bit and 8-bit storage.

defaults:
  - override /model: tiny

bench:
  repetitions: 2
  rep_budget_s: 0.05

milestone:
  name: tiny-new
  title: One New File
  context_length: 64
  criteria:
    fill_rate: {threshold: 1}
    retrieve_rate: {threshold: 1}
    kv_cache: {threshold: 0.001}
    token_gen: {threshold: 0.1}
    total_vram: {threshold: 64}
    decode_beats_zero: {metric: decode_cache_tok_s, op: ">", threshold: 0} # a criterion of its own

grid:
  cache:
    dtype: [float16, int8]
"""


def test_a_new_milestone_file_runs_end_to_end_with_no_other_edit(ray_session, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "milestone" / "tiny-new.yaml").write_text(NEW_MILESTONE)
    assert "tiny-new" in available_milestones(conf) and "tiny-new" not in available_milestones()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["+milestone=tiny-new", f"tracking.uri={uri}", f"spool.dir={tmp_path / 'spool'}"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    sweep = load_sweep(cfg, cwd=tmp_path, overrides=overrides)
    assert (sweep.milestone, sweep.title, sweep.experiment) == ("tiny-new", "One New File", "kvbench-tiny-new")
    # the five default criteria with their metric and op from conf/config.yaml, and its own
    assert [str(c) for c in sweep.criteria] == [
        "fill_rate_pos_s > 1", "retrieve_rate_ops_s > 1", "kv_cache_gb < 0.001", "decode_tok_s > 0.1",
        "total_vram_gb < 64", "decode_cache_tok_s > 0"]
    assert [(t.params["cache.dtype"], t.params["milestone.context_length"], t.params["model.num_layers"])
            for t in sweep.trials] == [("float16", 64, 3), ("int8", 64, 3)]

    err = io.StringIO()
    assert execute(sweep, tmp_path, out=io.StringIO(), err=err) == 0, err.getvalue()
    client = MlflowClient(uri)
    [parent] = parents(client, client.get_experiment_by_name("kvbench-tiny-new").experiment_id)
    assert parent.data.tags["verdict"] == "PASS" and parent.data.metrics["n_trials"] == 2
    runs = children(client, parent.info.run_id)
    assert sorted(r.data.params["cache.dtype"] for r in runs) == ["float16", "int8"]
    for run in runs:
        assert run.data.tags["verdict"] == "PASS"
        assert run.data.metrics["decode_cache_tok_s"] > 0 and run.data.metrics["kv_cache_gb"] < 0.001
