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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from utils.config import IMAGE_EXTENSIONS, LITERT_FILE, MODEL_DIR, MODEL_FILE
from utils.evaluate import class_probabilities
from utils.explain import blend, heat_map, heat_palette, probabilities_and_maps
from utils.files import BadImage, UserError, fail
from utils.images import list_images, load_image
from utils.plots import save_image_grid, write_picture
from utils.runtime import BATCH, default_model, load_model


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
        help="show where the model looked for the label it chose (a LayerCAM heat map over the photo): one JPEG "
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
