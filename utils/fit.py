"""Training that survives kill -9: validation of the averaged weights, the best epoch, the log and the backup."""

import contextlib
import csv
import json
import shutil
from pathlib import Path

import numpy as np

from utils.augment import resizer
from utils.backend import import_keras
from utils.evaluate import MIRROR_TTA, accuracy, best_epoch, log_loss, plain_and_mirrored
from utils.files import UserError, atomic_write, check_space, write_json


def chunks(images, size=None, n=512, engine="layers"):
    """The images (array or DiskImages) n at a time, as float32 at side length size (default: as they are)."""
    for i in range(0, len(images), n):
        chunk = images[i : i + n]
        yield chunk if size in (None, chunk.shape[1]) else resizer(engine)(chunk, size)


def evaluate(model, images, size=None, engine="layers"):
    """(plain, mirror-averaged) class probabilities of the images (plain_and_mirrored), a chunk at a
    time, so a streamed split never sits in memory whole."""
    parts = [plain_and_mirrored(batched(model), chunk) for chunk in chunks(images, size, engine=engine)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([b for _, b in parts])


def batched(model):
    """run(images) -> the model's outputs, 256 images a call (what class_probabilities calls)."""
    return lambda images: np.concatenate(
        [np.asarray(model(images[i : i + 256], training=False)) for i in range(0, len(images), 256)]
    )


def read_log(path):
    """Epoch rows of the CSV log, each epoch once (a row written twice around a crash counts once)."""
    if not path.exists():
        return []
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return [rows[e] for e in sorted(rows)]


@contextlib.contextmanager
def averaged_weights(model):
    """A context in which the model holds the moving average of its weights (if the optimizer keeps one)."""
    if not model.optimizer.use_ema:
        yield
        return
    swap = import_keras().callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap.on_test_begin()  # puts the averages into the model
    try:
        yield
    finally:
        swap.on_test_end()  # and the trained weights back


def training_callbacks(model, work, sizes, x_val, y_val, engine, epochs, elapsed, tensorboard_dir=None):
    """Validation, best-epoch keeping, the log and the backup, in the order kill -9 needs. sizes: each epoch's
    image size; engine: whose resize validation uses; elapsed(): seconds of the run so far."""
    keras = import_keras()
    callbacks = [
        # Keras prints "Epoch N/M" only when M > 1; a 1-epoch run gets the same line from here.
        keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: print("Epoch 1/1", flush=True) if epochs == 1 else None
        ),
        validation(model, sizes, x_val, y_val, engine, elapsed),
        # Order matters for kill -9: an epoch is logged only after its best weights are whole, and a
        # logged epoch whose backup is missing is simply trained again (read_log keeps it once).
        keep_best(model, work, sizes),
        keras.callbacks.CSVLogger(str(work / "log.csv"), append=True),
        backup_class(state_bytes(model))(str(work / "backup"), delete_checkpoint=False),
    ]
    if tensorboard_dir:
        callbacks.append(keras.callbacks.TensorBoard(str(tensorboard_dir)))
    return callbacks


def validation(model, sizes, x_val, y_val, engine, elapsed):
    """A callback that logs validation accuracy and loss of the averaged weights at the epoch's image size,
    with and without the mirror-image average (val_accuracy is what MIRROR_TTA chooses)."""
    keras = import_keras()
    val_at = {}

    class Validate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs):
            size = sizes[epoch]
            if size not in val_at and isinstance(x_val, np.ndarray):  # in memory: resized once per size
                val_at[size] = resizer(engine)(x_val, size) if size != x_val.shape[1] else x_val
            with averaged_weights(model):  # both kinds logged: one pass each
                plain, both = evaluate(model, val_at.get(size, x_val), size, engine)
            chosen = both if MIRROR_TTA else plain  # what class_probabilities gives
            logs.update(
                val_accuracy=accuracy(chosen, y_val),
                val_loss=log_loss(chosen, y_val),
                val_accuracy_plain=accuracy(plain, y_val),
                val_accuracy_mirror=accuracy(both, y_val),
                image_size=size,
                elapsed_seconds=round(elapsed()),
                learning_rate=float(model.optimizer.learning_rate),  # where the schedule is after this epoch
            )

    return Validate()


def keep_best(model, work, sizes):
    """A callback that saves the averaged weights of each epoch that utils.evaluate.best_epoch picks among the
    epochs so far (final size: sizes[-1]) as best-NNN.weights.h5, and removes older ones once the log no longer
    points at them."""
    keras = import_keras()
    weights_bytes = state_bytes(model)

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs):
            log = [r for r in read_log(work / "log.csv") if r["epoch"] < epoch]  # this epoch is not logged yet
            if best_epoch(columns([*log, {**logs, "image_size": sizes[epoch]}]), sizes[-1]) == len(log):
                with averaged_weights(model):
                    atomic_write(
                        work / f"best-{epoch + 1:03d}.weights.h5", model.save_weights, need=weights_bytes, staged=True
                    )
                keep = {f"best-{epoch + 1:03d}.weights.h5", best_file(work, sizes[-1]).name}
                for old in work.glob("best-*.weights.h5"):
                    if old.name not in keep:
                        old.unlink()

    return KeepBest()


def columns(log):
    """The log's validation accuracy and image size by epoch, as utils.evaluate.best_epoch reads them."""
    return {"val_accuracy": [r["val_accuracy"] for r in log], "image_size": [r.get("image_size") for r in log]}


def best_file(work, final_size):
    """The weights file of the logged epoch that utils.evaluate.best_epoch picks."""
    log = read_log(work / "log.csv")
    if not log:
        return work / "best-000.weights.h5"
    return work / f"best-{int(log[best_epoch(columns(log), final_size)]['epoch']) + 1:03d}.weights.h5"


def state_bytes(model):
    """Bytes of a weights file with the optimizer's state (its moments and the EMA) beside the weights."""
    return 4 * model.count_params() * 4 + 1_000_000


def backup_class(need):
    keras = import_keras()

    class AtomicBackup(keras.callbacks.BackupAndRestore):
        """Keras's BackupAndRestore, but the weights and the epoch they hold change in one rename: each save
        writes a weights file named by its epoch, then the metadata that points to it, then drops the older
        file. Keras writes latest.weights.h5 and then the metadata, so kill -9 between the two would pair
        one epoch's weights (and optimizer step) with the previous epoch's number."""

        def _save_model(self):
            name = f"epoch-{self._current_epoch:03d}.weights.h5"
            save = lambda tmp: self.model.save_weights(tmp, overwrite=True)  # noqa: E731
            atomic_write(Path(self.backup_dir) / name, save, need=need, staged=True)
            state = {"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name}
            write_json(self._training_metadata_path, state)
            for old in Path(self.backup_dir).glob("epoch-*.weights.h5"):
                if old.name != name:
                    old.unlink()

        def _load_model(self):
            meta = Path(self._training_metadata_path)
            if not meta.exists():  # weights without metadata are a save cut short: start afresh
                return
            state = json.loads(meta.read_text())
            if not self.model.optimizer.built:  # its moments and step counter are in the file too
                self.model.optimizer.build(self.model.trainable_variables)
            # a backup without "weights" is in BackupAndRestore's own layout: its weights are latest.weights.h5
            self.model.load_weights(Path(self.backup_dir) / state.get("weights", "latest.weights.h5"))
            self.model._initial_epoch = state["epoch"]

    return AtomicBackup


def forget_unbacked_epochs(log, first):
    """Drop log rows of epochs that the backup does not hold: a resumed run trains them again."""
    if log.exists():
        lines = log.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < first]
        if kept != lines:
            atomic_write(log, lambda tmp: Path(tmp).write_text("".join(kept)))


def start_work(work, config, resume, need):
    """The run's working folder ready, returning the epochs its backup already holds: room for need bytes
    checked first, so a refused run leaves an unfinished one alone; that one discarded unless resume."""
    check_space(work.parent, need)
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "config.json", config)
    first = finished_epochs(work)
    forget_unbacked_epochs(work / "log.csv", first)
    return first


def finished_epochs(work):
    """Epochs the backup holds (where a resumed fit starts)."""
    meta = work / "backup" / "training_metadata.json"
    return json.loads(meta.read_text())["epoch"] if meta.exists() else 0


def check_resume(work, config):
    """Refuse --resume when work holds no run, or one started with other flags or image sizes than config's."""
    if not (work / "config.json").exists():
        raise UserError(f"nothing to resume in {work.parent}; run without --resume to start training")
    saved = json.loads((work / "config.json").read_text())
    named = {"image_sizes": "image size by epoch"}  # set in utils.warps, not by a flag
    diff = [
        f"{named.get(k, '--' + k.replace('_', '-'))} {saved.get(k)} (now {config[k]})"
        for k in config
        if k in saved and saved[k] != config[k]  # a run written before a key existed is not refused for it
    ]
    if diff:
        raise UserError(f"--resume needs the flags of the interrupted run: {', '.join(diff)}")


def resume_command(argv, resume=True):
    """The command that continues this run: the same flags, with --resume (or, before it began, without)."""
    flags = " ".join(argv).replace("--resume", "").strip()
    return f"python train.py {flags}{' --resume' if resume else ''}".replace("  ", " ").strip()
