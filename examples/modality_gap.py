"""The modality gap (Liang et al. 2022, "Mind the Gap") of a CLIP model's embeddings, before and after the shift
along the gap vector: mmfast.analysis.modality_gap / shift_embeddings, and a PNG of both modalities' 2-D PCA.

    python examples/modality_gap.py                       # a small random open_clip model, random images and texts
    python examples/modality_gap.py --synthetic           # labelled toy classes, a known gap (no open_clip)
    python examples/modality_gap.py --image-features img.pt --text-features txt.pt [--labels labels.pt]
        # your own [N, D] image and [M, D] text embeddings; with labels [N] (indices into the M text rows, e.g.
        # class prompts) the sweep reports zero-shot top-1 accuracy at each shift
    options: --alpha 1.0 (the plotted shift: image - alpha/2 * gap, text + alpha/2 * gap), --sweep -1,0,0.5,1,1.5
    (the shifts tabulated: gap norm, and top-1 where there are labels), --out modality_gap.png

A randomly initialized CLIP already shows the gap: each tower maps every input into a narrow cone of its own
(the paper's "cone effect"), so even random weights give two separable clusters.
"""
from __future__ import annotations

import argparse
import math

import torch

import common  # noqa: F401  (makes a checkout importable)
from mmfast.analysis import modality_gap, shift_embeddings  # noqa: E402


def synthetic(n: int, classes: int = 10, dim: int = 64, seed: int = 0):
    """A labelled toy: `classes` directions u_k; image rows 0.6*e_0 + 0.5*u_label + noise, one text row per class
    0.6*e_1 + 0.5*u_k (a zero-shot classifier's class embeddings). The gap is 0.6*(e_0 - e_1) before
    normalization. Returns (image [n, dim], text [classes, dim], labels [n])."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    directions[:, :2] = 0
    labels = torch.randint(0, classes, (n,), generator=g)
    image = 0.5 * directions[labels] + 0.15 * torch.randn(n, dim, generator=g)
    image[:, 0] += 0.6
    text = 0.5 * directions + 0.05 * torch.randn(classes, dim, generator=g)
    text[:, 1] += 0.6
    return image, text, labels


@torch.no_grad()
def random_clip(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of n random images and n random token sequences by a small random open_clip CLIP."""
    from clip_train import SMALL_CONTEXT, SMALL_VOCAB, small_clip

    torch.manual_seed(seed)
    model = small_clip().eval()
    images = torch.randn(n, 3, 32, 32)
    tokens = torch.randint(1, SMALL_VOCAB, (n, SMALL_CONTEXT))
    return model.encode_image(images), model.encode_text(tokens), None


def pca_2d(*parts: torch.Tensor) -> list[torch.Tensor]:
    """The parts projected on the first two principal axes of their union, each part weighted equally (500
    image rows against 10 class prompts would otherwise hide the gap behind the image rows' own spread)."""
    parts = [p.double() for p in parts]
    center = torch.stack([p.mean(0) for p in parts]).mean(0)
    weighted = torch.cat([(p - center) / p.shape[0] ** 0.5 for p in parts])
    _, _, v = torch.linalg.svd(weighted, full_matrices=False)
    return [(p - center) @ v[:2].T for p in parts]


def describe(title: str, result) -> str:
    return (f"{title}: gap norm {result.gap_norm:.3f}, cosine image-image {result.image_cosine:.3f}, "
            f"text-text {result.text_cosine:.3f}, image-text {result.cross_cosine:.3f}, "
            f"linear separability {result.separability:.3f} (held out, 0.5 = chance)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="two cones with a known gap instead of a model")
    parser.add_argument("--image-features", help="a torch.save'd [N, D] tensor of image embeddings")
    parser.add_argument("--text-features", help="a torch.save'd [M, D] tensor of text embeddings")
    parser.add_argument("--labels", help="a torch.save'd [N] tensor: each image's row of --text-features")
    parser.add_argument("--n", type=int, default=500, help="image rows (and text rows for the model)")
    parser.add_argument("--sweep", default="-1,0,0.5,1,1.5", help="shifts (alpha) to tabulate, comma-separated")
    parser.add_argument("--alpha", type=float, default=1.0, help="the shift; 1 closes the gap")
    parser.add_argument("--out", default="modality_gap.png")
    args = parser.parse_args()

    if (args.image_features is None) != (args.text_features is None):
        parser.error("pass both --image-features and --text-features, or neither")
    if args.image_features is not None:
        image, text = torch.load(args.image_features), torch.load(args.text_features)
        labels = torch.load(args.labels) if args.labels else None
        source = f"{args.image_features} / {args.text_features}"
    elif args.synthetic:
        image, text, labels = synthetic(args.n)
        source = "synthetic classes"
    else:
        image, text, labels = random_clip(args.n)
        source = "a small random open_clip CLIP"

    before = modality_gap(image, text)
    shifted = shift_embeddings(image, text, before.gap, args.alpha)
    after = modality_gap(*shifted)
    print(describe("before", before))
    print(describe(f"after the shift (alpha={args.alpha:g})", after))
    print("alpha  gap norm" + ("  zero-shot top-1" if labels is not None else ""))
    for alpha in (float(a) for a in args.sweep.split(",")):
        img, txt = shift_embeddings(image, text, before.gap, alpha)
        line = f"{alpha:5g}  {(img.double().mean(0) - txt.double().mean(0)).norm().item():8.3f}"
        if labels is not None:
            line += f"  {((img @ txt.T).argmax(-1) == labels).double().mean().item():16.3f}"
        print(line)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    normalized = [torch.nn.functional.normalize(t.double(), dim=-1) for t in (image, text)]
    for ax, (img, txt), result, title in ((axes[0], normalized, before, "before"),
                                          (axes[1], shifted, after, f"after shift, alpha={args.alpha:g}")):
        p_img, p_txt = pca_2d(img, txt)
        ax.scatter(*p_img.T, s=6, alpha=0.6, label="image")
        ax.scatter(*p_txt.T, s=6, alpha=0.6, label="text")
        ax.set_title(f"{title}\ngap {result.gap_norm:.3f}, separability {result.separability:.2f}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend()
    fig.suptitle(f"Modality gap, 2-D PCA of both modalities: {source}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0 if math.isfinite(before.gap_norm) else 1


if __name__ == "__main__":
    raise SystemExit(main())
