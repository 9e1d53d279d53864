"""What `fm-train` refuses up front, in one line, instead of a traceback deep in training (or a silent
surprise): bad values, a checkpoint of another model in the output folder, an encoder that does not
fit the config, --weights without --from, and a tracking store that cannot be used."""

from __future__ import annotations

import random
import time

import pytest

from evaluation.core_domain import demo_source
from fm.cli import UserError
from fm.config import resolve_config
from fm.tracking import TrackingStoreError, tracked_run
from fm.train import CONFIGS_DIR, build_module, check_run_config, run_pretraining

TINY = ["model.backbone.embed_dim=48", "model.backbone.depth=2", "model.backbone.num_heads=3",
        "model.dino.n_prototypes=64", "model.ibot.n_prototypes=64", "data.batch_size=4", "crops.n_local=2",
        "data.demo_images=32", "train.epochs=1", "train.epoch_length=20", "train.checkpoint_every=1"]


def tiny_cfg(tmp_path, *extra: str) -> dict:
    return resolve_config(CONFIGS_DIR / "core" / "demo_cpu.yaml",
                          overrides=[*TINY, f"train.output_dir={tmp_path}/run", *extra])


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", r"--batch-size \(data.batch_size\) must be at least 1"),
    ("train.max_steps=0", r"--max-steps \(train.max_steps\) must be at least 1"),  # used to train the whole schedule
    ("train.max_steps=-1", r"--max-steps .* got -1"),  # used to run past the end of the schedule
    ("crops.mean=[0.5,0.5]", r"crops.mean has 2 values for a backbone of 3 input channels"),
    ("model.init_weights=/nowhere/w.pth", r"--weights /nowhere/w.pth needs --from ENCODER"),  # was ignored
])
def test_bad_values_are_refused_in_one_line(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        check_run_config(tiny_cfg(tmp_path, override))
    check_run_config(tiny_cfg(tmp_path))  # the control: the same config without the bad value passes


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("a log file")
    with pytest.raises(UserError, match=r"--output-dir .*run is a file"):
        check_run_config(tiny_cfg(tmp_path))


def test_a_checkpoint_of_another_model_or_a_damaged_one_is_not_resumed(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.max_steps=2")
    run_pretraining(cfg, demo_source(cfg), progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    other = tiny_cfg(tmp_path, "train.max_steps=3", "model.dino.n_prototypes=128")
    with pytest.raises(UserError, match=rf"cannot resume from {last}: it is a run of another model .*"
                                        r"checkpoint \(1, 64\), config \(1, 128\).*train.resume=false, or use another --output-dir"):
        run_pretraining(other, demo_source(other), progress=False)
    last.write_bytes(last.read_bytes()[:1000])  # cut short
    same = tiny_cfg(tmp_path, "train.max_steps=3")
    with pytest.raises(UserError, match=rf"cannot resume from {last}: not a readable training checkpoint"):
        run_pretraining(same, demo_source(same), progress=False)


def test_an_encoder_that_does_not_fit_the_config_says_what_both_are(tmp_path):
    first = run_pretraining(tiny_cfg(tmp_path / "a", "train.max_steps=1"), demo_source(tiny_cfg(tmp_path)),
                            progress=False)
    wider = tiny_cfg(tmp_path / "b", f"model.init={first.export}", "model.backbone.embed_dim=96")
    with pytest.raises(UserError, match=r"is a vit\w+/\d+ \(48-d, 2 blocks.*config builds a vit\w+/\d+ \(96-d, "
                                        r"2 blocks.*--config fm/configs/core/dinov2_vitl14.yaml"):
        build_module(wider)
    build_module(tiny_cfg(tmp_path / "c", f"model.init={first.export}"))  # the control: a fitting config loads


def test_a_tracking_server_that_does_not_answer_fails_in_seconds(tmp_path):
    start = time.monotonic()
    with pytest.raises(TrackingStoreError, match=r"cannot reach the MLflow tracking server http://me:\*\*\*@127.0.0.1:9 "
                                                 r"\(\[Errno 111\] Connection refused\)") as err:
        with tracked_run("x", tracking_uri="http://me:secret@127.0.0.1:9"):
            pass
    assert time.monotonic() - start < 30  # MLflow's own retries took minutes
    assert "secret" not in str(err.value)


def test_the_probe_passes_any_server_that_answers():
    """Only no answer at all counts as down: a server (or a proxy) answering /health with any status
    passes, as MLflow itself would reach it."""
    import http.server
    import threading

    from fm.tracking_store import probe_server

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the handler API)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        probe_server(f"http://127.0.0.1:{server.server_port}/some/prefix")
    finally:
        server.shutdown()


def test_a_refused_store_is_one_line_naming_it(tmp_path):
    uri = f"file://{tmp_path}/mlruns"
    with pytest.raises(TrackingStoreError, match=rf"MLflow tracking store {uri}: The filesystem tracking backend"):
        with tracked_run("x", tracking_uri=uri):
            pass


def test_runs_get_distinct_names_although_training_seeds_random(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = []
    for _ in range(2):
        random.seed(0)  # what seed_everything does before every pretraining run
        with tracked_run("names", tracking_uri=uri) as run:
            ids.append(run.run_id)
    client = MlflowClient(tracking_uri=uri)
    names = [client.get_run(i).info.run_name for i in ids]
    assert names[0] != names[1] and all(n.startswith("names-") for n in names)


def test_export_every_checkpoint_writes_the_teacher_of_each_checkpoint(tmp_path):
    from fm.registry import load_encoder

    cfg = tiny_cfg(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.export_every_checkpoint=true")
    result = run_pretraining(cfg, demo_source(cfg), progress=False)
    exports = sorted(p.name for p in (tmp_path / "run" / "export").glob("teacher_step*.safetensors"))
    assert exports == ["teacher_step0000002.safetensors", "teacher_step0000004.safetensors"]
    step2, step4 = (load_encoder(str(tmp_path / "run" / "export" / n)).backbone for n in exports)
    final = load_encoder(str(result.export)).backbone
    assert not step2.vit.cls_token.equal(step4.vit.cls_token) and step4.vit.cls_token.equal(final.vit.cls_token)
    with pytest.raises(UserError, match="not supported with --strategy fsdp"):
        check_run_config(tiny_cfg(tmp_path, "train.export_every_checkpoint=true", "train.strategy=fsdp"))
