"""Pointing game: does the heat map of predict.py --explain point at the animal?

    python benchmarks/pointing_game.py                     # 200 canvases of each background, shipped model
    python benchmarks/pointing_game.py --n 50 --seed 0 --model models/cats_vs_dogs.keras

Each canvas is a real cat or dog photo of the shared zip pasted at a random place into a canvas three
times its size filled with something that is neither (flat grey, or blurred noise). A hit is a canvas
whose heat-map peak (for the label the model chose) falls inside the pasted photo. A map that ignores
position, is mirrored, or comes from the wrong layer scores far lower; tests/test_explain.py plays 50.
"""

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.explain import heat_map, probabilities_and_maps  # noqa: E402
from utils.images import load_image, open_image  # noqa: E402
from utils.runtime import default_model, load_model  # noqa: E402

SHARED_ZIP = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "PetImages-180px.zip"
BACKGROUNDS = ("grey", "noise")


def canvases(zip_path, n, seed, background="grey", scale=3):
    """n (canvas as PNG bytes, (x0, y0, x1, y1) of the pasted photo in canvas pixels, side of the canvas)."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(name for name in zf.namelist() if name.lower().endswith(".jpg"))
        for i in rng.choice(len(names), n, replace=False):
            photo = open_image(zf.read(names[i]))
            side = scale * max(photo.size)
            if background == "grey":
                canvas = Image.new("RGB", (side, side), (128, 128, 128))
            else:
                noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                canvas = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(side / 60))
            x0, y0 = (int(v) for v in rng.integers(0, [side - photo.size[0] + 1, side - photo.size[1] + 1]))
            canvas.paste(photo, (x0, y0))
            buf = io.BytesIO()
            canvas.save(buf, "PNG")
            yield buf.getvalue(), (x0, y0, x0 + photo.size[0], y0 + photo.size[1]), side


def hits(model, games, transform=None):
    """Per canvas: does the peak of the chosen label's heat map fall inside the photo? model: a
    utils.runtime.Loaded with explain; transform(heat) -> heat, to check that a wrong map does score lower."""
    out = []
    for png, (x0, y0, x1, y1), side in games:
        image = load_image(png, model.size)[None]
        probs, maps = probabilities_and_maps(model.explain, image)
        heat = heat_map(maps[0, :, :, int(np.argmax(probs[0]))], model.size)
        if transform is not None:
            heat = transform(heat)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        cx, cy = (x + 0.5) * side / model.size, (y + 0.5) * side / model.size  # the peak in canvas pixels
        out.append(bool(x0 <= cx < x1 and y0 <= cy < y1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model file or folder (default: predict.py's default)")
    p.add_argument("--zip", type=Path, default=SHARED_ZIP, help="photos to paste (default: %(default)s)")
    p.add_argument("--n", type=int, default=200, help="canvases per background (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which photos and places (default: %(default)s)")
    args = p.parse_args(argv)
    model = load_model(args.model or default_model(), explain=True)
    for background in BACKGROUNDS:
        score = hits(model, canvases(args.zip, args.n, args.seed, background))
        mirrored = hits(model, canvases(args.zip, args.n, args.seed, background), lambda h: h[::-1, ::-1])
        print(
            f"{background}: peak inside the photo on {sum(score)}/{len(score)} canvases ({np.mean(score):.1%}); "
            f"the same maps turned upside down and mirrored: {np.mean(mirrored):.1%}"
        )


if __name__ == "__main__":
    main()
