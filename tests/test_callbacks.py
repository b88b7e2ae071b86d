"""The training loop's callbacks (complexity_dist/train/callbacks.py): the hooks run in their documented order
with the step's record, a callback's metrics reach metrics.jsonl, and on_end runs with the exit code also when
the run stops early. One process, one short run (the other callbacks are covered by the tests of what they do:
test_train, test_train_coverage, test_eval, test_tracking, the weight-dump parity tests)."""
import json
import sys

from conftest import free_port
from test_train import ROOT, SMALL, dataset, run  # noqa: F401  (dataset is a fixture)

SCRIPT = r'''
import json, os, sys
from complexity_dist.config import load_config
from complexity_dist.parallel.distributed import init_distributed
from complexity_dist.train.callbacks import Callback, default_callbacks
from complexity_dist.train.trainer import Trainer

cfg = load_config(sys.argv[1], sys.argv[3:])
env = init_distributed(cfg)
calls = []


class Recorder(Callback):
    def on_start(self, trainer):
        calls.append(["start", trainer.step])

    def before_step(self, trainer, step):
        calls.append(["before", step])

    def after_step(self, trainer, record):
        calls.append(["after", record.step, record.skipped, sorted(record.metrics)[:3]])
        record.metrics["recorded"] = record.step * 10  # logged by the reporter, which runs after this one

    def on_end(self, trainer, exit_code):
        calls.append(["end", exit_code, trainer.step])


trainer = Trainer(cfg, env, None)
code = trainer.fit(callbacks=[Recorder(), *default_callbacks(trainer)])
json.dump({"code": code, "calls": calls}, open(sys.argv[2], "w"))
'''


def test_callbacks_run_in_order_and_their_metrics_are_logged(tmp_path, dataset):  # noqa: F811
    out, run_dir = tmp_path / "calls.json", tmp_path / "run"
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "COMPLEXITY_DIST_PREEMPT_AT": "2"}  # InjectedPreemption: the run stops after step 2 of 3
    run([sys.executable, "-c", SCRIPT, str(ROOT / "configs/tiny.yaml"), str(out), *SMALL,
         f"train.run_dir={run_dir}", f"data.path={dataset}", "train.steps=3", "checkpoint.every=10"], env_extra=env)
    got = json.loads(out.read_text())
    assert got["code"] == 99  # EXIT_REQUEUE: saved, then stopped for a requeue
    assert got["calls"] == [["start", 0],
                            ["before", 1], ["after", 1, False, ["grad_norm", "loss", "lr"]],
                            ["before", 2], ["after", 2, False, ["grad_norm", "loss", "lr"]],
                            ["end", 99, 2]]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["recorded"] for r in rows] == [10, 20]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]
