"""Pictures written as files: figures, grids of photos, and one explained photo beside its heat map."""

import sys

import numpy as np

from utils.explain import HEAT_COLORMAP, blend, heat_colors, heat_map
from utils.files import atomic_write


def save_figure(fig, path, dpi=100):
    """Write a matplotlib figure to path as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def save_image_grid(images, titles, title, path, cols=4, heat_legend=False):
    """Draw images (arrays or PIL images) in a titled grid and save it as PNG; heat_legend: the images carry
    heat maps (blend), so add a colour bar saying what their colours mean."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows + 0.6 * heat_legend), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image)
        ax.set_title(text, fontsize=11)
    fig.suptitle(title, fontsize=14)
    if heat_legend:
        mappable = matplotlib.cm.ScalarMappable(cmap=HEAT_COLORMAP)
        bar = fig.colorbar(mappable, ax=axes, orientation="horizontal", fraction=0.4 / (3.3 * rows + 0.6), pad=0.02)
        bar.set_ticks([0, 1], labels=["looked less", "looked most (LayerCAM of the label)"])
    save_figure(fig, path, dpi=72)  # photos compress poorly: keep the PNG small


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
    """Draw one explained picture and save it whole, as JPEG (much smaller and quicker to write than PNG,
    which a folder of thousands of photos feels)."""
    image = picture(img, class_map, title)
    atomic_write(path, lambda tmp: image.save(tmp, "JPEG", quality=90))
