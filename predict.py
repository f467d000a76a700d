"""Label photos with a model from train.py: cat or dog with the shipped model, your classes with yours.

    python predict.py photo.jpg
    python predict.py examples/ more/photos --json
    python predict.py examples/ --show grid.png
    python predict.py flowers/ --model models/flowers --top 3
    python predict.py photo.jpg --explain       # and where the model looked: explained/photo.jpg

PATH may be an image or a folder (searched recursively for .jpg .jpeg .png .bmp
.gif .webp, any case). The class names come from inside the model file. Exit status:
0 all predicted, 1 some images could not be read, 2 usage error (no model, not a
model, no such path, no images found).
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from utils import (
    IMAGE_EXTENSIONS,
    LABELS_FILE,
    LITERT_FILE,
    MODEL_DIR,
    MODEL_FILE,
    BadImage,
    UserError,
    atomic_write,
    blend,
    class_names_layer,
    class_probabilities,
    explaining_model,
    fail,
    heat_colors,
    heat_map,
    heat_palette,
    import_keras,
    list_images,
    load_image,
    names_of_keras_model,
    probabilities_and_maps,
    quiet_stderr,
    read_labels,
    save_image_grid,
    unpack_labels,
)

BATCH = 64  # images decoded and predicted at a time, so memory stays flat for any number of files


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument(
        "--model",
        type=Path,
        help=f"a .keras or .tflite model file from train.py, or the folder train.py wrote it to (default: "
        f"{MODEL_DIR / LITERT_FILE} when it is there and ai-edge-litert is installed, else {MODEL_DIR / MODEL_FILE})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"path", "label", "probabilities": {class: p, ...}} (a two-class model '
        'adds "<second class>_probability", dog_probability for cats and dogs), or {"path", "error"}',
    )
    p.add_argument(
        "--top",
        type=int,
        default=1,
        metavar="K",
        help="print the K most probable classes of each image, best first (default: %(default)s)",
    )
    p.add_argument("--show", type=Path, metavar="OUT.png", help="also draw the images with their labels into OUT.png")
    p.add_argument(
        "--explain",
        action="store_true",
        help="show where the model looked for the label it chose (a Grad-CAM heat map over the photo): one JPEG "
        'per image in --explain-dir, and over the --show grid; --json rows gain "explained" and "heat_peak"',
    )
    p.add_argument(
        "--explain-dir",
        type=Path,
        default=Path("explained"),
        metavar="DIR",
        help="folder for --explain's pictures, one <image name>.jpg each (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be at least 1")
    return args


def collect(paths):
    """Expand folders into their image files; raise UserError for a path that gives nothing."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise UserError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found in folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def litert_available():
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def default_model():
    """models/cats_vs_dogs.tflite when it is there and LiteRT imports (no TensorFlow start-up), else the .keras file."""
    litert = MODEL_DIR / LITERT_FILE
    return litert if litert.is_file() and litert_available() else MODEL_DIR / MODEL_FILE


def model_in(folder):
    """The model file in a folder train.py wrote: its .tflite when LiteRT imports, else its .keras."""
    for suffix in (".tflite", ".keras") if litert_available() else (".keras",):
        found = sorted(folder.glob(f"*{suffix}"))
        if len(found) == 1:
            return found[0]
    raise UserError(f"{folder} holds no single .keras or .tflite model; pass --model FILE")


class Loaded(NamedTuple):
    """A model ready to predict: run(batch of uint8 images) -> its outputs; explain(batch) -> (outputs, each
    output's Grad-CAM map), or None when not asked for or the file has no maps (utils.explaining_model)."""

    run: Callable
    size: int
    names: list
    explain: Callable | None


def load_model(path, explain=False):
    """The Loaded model of a .keras or .tflite file that carries its class names (or has labels.txt beside
    it); explain: also its heat maps (UserError when the file cannot give them)."""
    if path.is_dir():
        path = model_in(path)
    if not path.is_file():
        raise UserError(f"model {path} not found; train one with `python train.py` or pass --model FILE")
    load = load_litert if path.suffix.lower() == ".tflite" else load_keras
    run, shape, out_shape, names, explainer = load(path, explain)
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or not shape[1] or len(out_shape) != 2:
        raise UserError(
            f"{path} takes input {tuple(shape)} and gives {tuple(out_shape)}; "
            "expected a model from train.py (square RGB images in, class probabilities out)"
        )
    if names is None and (path.parent / LABELS_FILE).is_file():
        names = read_labels((path.parent / LABELS_FILE).read_bytes())
    if names is None:
        raise UserError(f"{path} carries no class names and has no {LABELS_FILE} beside it; retrain it with train.py")
    outputs = out_shape[1]
    if len(names) != (2 if outputs == 1 else outputs) or len(set(names)) != len(names) or outputs < 1:
        raise UserError(
            f"{path} gives {outputs} output(s) but names {len(names)} classes ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}); its class names do not match its outputs"
        )
    if explain and explainer is None:
        raise UserError(
            f"{path} has no heat maps (a LiteRT file from before --explain, or a model not built by train.py); "
            f"export it again with `python train.py --export {path.with_suffix('.keras')}` or pass its .keras file"
        )
    return Loaded(run, int(shape[1]), list(names), explainer if explain else None)


def load_keras(path, explain=False):
    keras = import_keras()
    class_names_layer()  # registers the layer that carries the names, so load_model finds it
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # a user's file can fail to load in many ways
        raise UserError(
            f"{path} is not a Keras model file ({type(e).__name__}); pass a .keras or .tflite file from train.py"
        ) from None
    if isinstance(model.input_shape, list) or isinstance(model.output_shape, list):
        return None, (), (), None, None

    def run(batch):
        """Full batches run through Keras's compiled predict step (about 2x faster here once traced);
        smaller ones, a single photo say, run eagerly and so skip the tracing."""
        if len(batch) == BATCH:
            return np.asarray(model.predict_on_batch(batch))
        return np.asarray(model(batch, training=False))  # any backend's tensor

    explain_run = None
    try:
        explainer = explaining_model(model) if explain else None
    except ValueError:  # not the network of utils.build_model: no maps to give
        explainer = None
    if explainer is not None:

        def explain_run(batch):
            outputs = explainer.predict_on_batch(batch) if len(batch) == BATCH else explainer(batch, training=False)
            return tuple(np.asarray(o) for o in outputs)

    return run, tuple(model.input_shape), tuple(model.output_shape), names_of_keras_model(model), explain_run


def load_litert(path, explain=False):
    """The LiteRT interpreter of a .tflite file (numpy in, numpy out; TensorFlow is never imported). train.py's
    files have two outputs: the class probabilities, and the heat maps (4-D) that --explain draws."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        keras_copy = path.with_suffix(".keras")
        raise UserError(
            f"{path} needs the LiteRT runtime: `pip install ai-edge-litert`, or pass --model {keras_copy}"
        ) from None
    try:
        with quiet_stderr():  # LiteRT prints its delegate notice, and its own error, to stderr
            interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
        (inp,), outs = interpreter.get_input_details(), interpreter.get_output_details()
        (out,) = [o for o in outs if len(o["shape"]) != 4] or [None]
        maps = ([o for o in outs if len(o["shape"]) == 4] or [None])[0]
    except Exception as e:
        raise UserError(
            f"{path} is not a LiteRT model file ({type(e).__name__}); pass a .keras or .tflite file from train.py"
        ) from None
    if inp["dtype"] != np.float32 or out is None or len(outs) > 2:
        return None, (), (), None, None
    batch_of = [None]

    def invoke(batch):
        if batch_of[0] != len(batch):  # the interpreter plans its memory for one batch size
            interpreter.resize_tensor_input(inp["index"], [len(batch), *inp["shape"][1:]])
            with quiet_stderr():  # the XNNPACK delegate announces itself here
                interpreter.allocate_tensors()
            batch_of[0] = len(batch)
        interpreter.set_tensor(inp["index"], np.asarray(batch, dtype=np.float32))
        interpreter.invoke()

    def run(batch):
        invoke(batch)
        return interpreter.get_tensor(out["index"]).copy()

    def explain_run(batch):
        invoke(batch)
        return interpreter.get_tensor(out["index"]).copy(), interpreter.get_tensor(maps["index"]).copy()

    explainer = explain_run if maps is not None else None
    return run, tuple(inp["shape"]), tuple(out["shape"]), unpack_labels(path), explainer


def predict(files, run, size, explain=None):
    """Yield (path, class probabilities or None, error or None, image or None, class maps or None) for each
    file, in order; the maps (h x w x classes, utils.probabilities_and_maps) when explain is given."""

    def read(path):
        try:
            return load_image(path, size), None
        except BadImage as e:
            return None, str(e)
        except OSError as e:
            return None, e.strerror or str(e)

    chunks = [files[i : i + BATCH] for i in range(0, len(files), BATCH)]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        pending = [pool.submit(read, path) for path in chunks[0]] if chunks else []
        for n, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            # decode the next batch while the model works on this one (two batches in memory at most)
            pending = [pool.submit(read, path) for path in chunks[n + 1]] if n + 1 < len(chunks) else []
            good = [img for img, _ in loaded if img is not None]
            probs, maps = iter(()), iter(())
            if good and explain:
                probs, maps = map(iter, probabilities_and_maps(explain, np.stack(good)))
            elif good:
                probs = iter(class_probabilities(run, np.stack(good)))
            for path, (img, error) in zip(chunk, loaded, strict=True):
                yield path, (None if error else next(probs)), error, img, (None if error or not explain else next(maps))


def rounded(probs, names):
    """{name: probability} rounded to 4 places (two classes: the second's, and 1 minus it, so they sum to 1)."""
    if len(names) == 2:
        second = round(float(probs[1]), 4)
        return {names[0]: round(1 - second, 4), names[1]: second}
    return {name: round(float(p), 4) for name, p in zip(names, probs, strict=True)}


def ranked(probs):
    """(name, p) best first; the label follows the printed probabilities (a tie goes to the earlier class)."""
    return sorted(probs.items(), key=lambda item: -item[1])


def show(results, out, explained=False):
    """Draw the predicted images (as the model saw them) in a grid with label and probability; explained:
    each with the heat map of where the model looked, and a colour bar."""
    if results:
        titles = [f"{label} {p:.0%}\n{Path(path).name[:24]}" for path, label, p, *_ in results]
        images = [blend(img, heat) if explained else img for _, _, _, img, heat in results]
        title = f"{'Where the model looked: ' if explained else 'Predictions of '}{len(results)} images"
        save_image_grid(images, titles, title, out, cols=6, heat_legend=explained)


SCALE = 2  # --explain's pictures draw the model's 160 px view at twice its size


def picture(img, class_map, title):
    """One explained image: the photo as the model saw it and, beside it, the same under the heat map of the
    label's class_map, a title, and a colour bar that says what the colours mean."""
    from PIL import Image, ImageDraw, ImageFont

    side = img.shape[0] * SCALE
    pad, top, bar = 8, 30, 34
    canvas = Image.new("RGB", (2 * side + 3 * pad, top + side + bar), "white")
    photo = Image.fromarray(img).resize((side, side), Image.BILINEAR)
    canvas.paste(photo, (pad, top))
    canvas.paste(Image.fromarray(blend(np.asarray(photo), heat_map(class_map, side))), (2 * pad + side, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)
    draw.text((pad, 7), title, fill="black", font=font)
    x0, x1, y = 2 * pad + side, 2 * pad + 2 * side, top + side + 6
    canvas.paste(Image.fromarray(heat_colors(np.linspace(0, 1, x1 - x0)[None].repeat(8, 0))), (x0, y))
    small = ImageFont.load_default(size=12)
    draw.text((x0, y + 10), "looked less", fill="black", font=small)
    draw.text((x1, y + 10), "looked most", fill="black", font=small, anchor="ra")
    return canvas


def write_picture(path, img, class_map, title):
    """Draw one explained picture and save it whole, as JPEG: 40 kB and under a millisecond (a PNG is 5x
    larger and 20x slower to write, which a folder of thousands of photos feels)."""
    image = picture(img, class_map, title)
    atomic_write(path, lambda tmp: image.save(tmp, "JPEG", quality=90))


def picture_path(folder, path, taken):
    """folder/<image name>.jpg, numbered when two images of the run share a name."""
    stem, n = Path(path).stem, 1
    name = f"{stem}.jpg"
    while name in taken:
        n += 1
        name = f"{stem}-{n}.jpg"
    taken.add(name)
    return folder / name


def main(argv=None):
    args = parse_args(argv)
    try:
        files = collect(args.paths)
        model = load_model(args.model or default_model(), explain=args.explain)
        if args.explain:
            heat_palette()  # matplotlib's colour map: a clear message where only requirements-predict.txt is
            args.explain_dir.mkdir(parents=True, exist_ok=True)
    except UserError as e:
        fail(str(e))
    except OSError as e:  # --explain-dir cannot be made
        fail(f"cannot write pictures to {args.explain_dir}: {e.strerror}")
    names, failed, kept, taken = model.names, 0, [], set()
    with ThreadPoolExecutor(1) as drawer:  # draws and writes the pictures while the model works on
        writing = []
        for path, probs, error, img, maps in predict(files, model.run, model.size, model.explain):
            if error:
                failed += 1
                print(json.dumps({"path": str(path), "error": error}) if args.json else f"{path}\terror: {error}")
                print(f"error: {path}: {error}", file=sys.stderr)
                continue
            probs = rounded(probs, names)
            best = ranked(probs)[: args.top]
            label, p = best[0]
            row = {"path": str(path), "label": label, "probabilities": probs}
            if len(names) == 2:  # the two-class contract: dog_probability for cats and dogs
                row[f"{names[1]}_probability"] = probs[names[1]]
            if args.top > 1:
                row["top"] = [{"label": n, "probability": q} for n, q in best]
            heat = None
            if args.explain:
                class_map = maps[:, :, names.index(label)]
                heat = heat_map(class_map, model.size)
                y, x = np.unravel_index(np.argmax(heat), heat.shape)
                out = picture_path(args.explain_dir, path, taken)
                row["explained"] = str(out)
                row["heat_peak"] = [round((x + 0.5) / model.size, 4), round((y + 0.5) / model.size, 4)]
                title = f"{label} {p:.0%}: where the model looked ({Path(path).name[:40]})"
                writing.append(drawer.submit(write_picture, out, img, class_map, title))
                if len(writing) > 2 * BATCH:  # a full disk stops the run early, not after every image
                    writing.pop(0).result()
            if args.json:
                print(json.dumps(row, ensure_ascii=False))
            else:
                print(f"{path}\t" + "\t".join(f"{n}\t{q:.3f}" for n, q in best))
            if args.show and len(kept) < 64:
                kept.append((path, label, p, img, heat))
        try:
            for job in writing:
                job.result()
            if args.show:
                show(kept, args.show, explained=args.explain)
        except UserError as e:  # a full disk, say
            drawer.shutdown(cancel_futures=True)
            fail(str(e))
    if args.explain:
        print(f"wrote {len(taken)} explained pictures to {args.explain_dir}/", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `predict.py folder | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
