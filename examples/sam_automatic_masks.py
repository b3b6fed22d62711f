"""segment-anything's SamAutomaticMaskGenerator with the mask decoder patched by mmfast, against unpatched.

    python examples/sam_automatic_masks.py                      # a small random SAM, synthetic images, CPU
    python examples/sam_automatic_masks.py --full --checkpoint sam_vit_b_01ec64.pth --images a.jpg b.jpg
    python examples/sam_automatic_masks.py --full               # ViT-B with random weights (timing only)

One Sam; each image goes through the generator unpatched, then `mmfast.patch(sam)` swaps the mask decoder's
two-way transformer in place and the same images go through again; `mmfast.unpatch(sam)` at the end. Printed
per image: the generator's time and the mask decoder's share of it (timed by forward hooks on
sam.mask_decoder, which the patch keeps), both ways, how many of the masks are identical and by how many
pixels the others differ (a pixel whose logit sits within rounding of the threshold can flip). mmfast changes
only the decoder: the image encoder's time is the same both ways.
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from common import pick_device, print_table, sync, timed

import mmfast  # noqa: E402  (after common, which makes a checkout importable)
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry  # noqa: E402
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402

# Small: no quality filter and no de-duplication, since a random model's masks score low and look alike; every
# proposal (3 per point) is then compared.
SMALL_GENERATOR = dict(points_per_side=8, points_per_batch=32, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                       box_nms_thresh=1.0)
FULL_GENERATOR = dict(points_per_side=32, points_per_batch=64)


def small_sam(seed: int = 0) -> Sam:
    """Sam assembled as segment_anything's build_sam does, at 128 px with a one-block ViT and a 64-channel
    decoder (2 heads: head dims 32 and 16, as SAM's 256 channels / 8 heads), random weights."""
    torch.manual_seed(seed)
    dim, size, patch = 64, 128, 16
    return Sam(image_encoder=ImageEncoderViT(depth=1, embed_dim=32, img_size=size, mlp_ratio=2, num_heads=2,
                                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), patch_size=patch,
                                             qkv_bias=True, use_rel_pos=True, global_attn_indexes=[0], window_size=4,
                                             out_chans=dim),
               prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                            input_image_size=(size, size), mask_in_chans=8),
               mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                   depth=2, embedding_dim=dim, mlp_dim=96, num_heads=2), transformer_dim=dim, iou_head_depth=2,
                   iou_head_hidden_dim=32),
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def synthetic_image(seed: int = 0, height: int = 96, width: int = 128) -> np.ndarray:
    """A colour gradient with a rectangle and a disc placed by `seed`, RGB uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    image = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (height + width)], axis=-1)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top:top + height // 3, left:left + width // 3] = rng.integers(0, 256, 3)
    cy, cx = rng.integers(height // 4, height), rng.integers(width // 4, width)
    image[(y - cy) ** 2 + (x - cx) ** 2 < (min(height, width) // 5) ** 2] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def load_image(path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


class DecoderClock:
    """Seconds spent in sam.mask_decoder, from forward hooks (kept by mmfast.patch like any other hook)."""

    def __init__(self, decoder: torch.nn.Module, device: torch.device):
        self.seconds, self.device, self._start = 0.0, device, 0.0
        decoder.register_forward_pre_hook(self._enter)
        decoder.register_forward_hook(self._leave)

    def _enter(self, module, args):
        sync(self.device)
        self._start = time.perf_counter()

    def _leave(self, module, args, output):
        sync(self.device)
        self.seconds += time.perf_counter() - self._start


def compare_masks(a: list[dict], b: list[dict]) -> tuple[int, int]:
    """(how many masks of `a` have an identical segmentation in `b`, the most pixels by which one of the others
    differs from its closest mask in `b`). A pixel flips only where its logit is within rounding of the mask
    threshold: tests/test_patching.py compares the logits themselves."""
    keys = {m["segmentation"].tobytes() for m in b}
    others = [m["segmentation"] for m in a if m["segmentation"].tobytes() not in keys]
    worst = max((min(int((m != n["segmentation"]).sum()) for n in b) for m in others), default=0)
    return len(a) - len(others), worst


def run(generator: SamAutomaticMaskGenerator, clock: DecoderClock, images, device, progress, label):
    """[(masks, total seconds, decoder seconds)] per image, after one untimed warm-up image."""
    generator.generate(images[0])
    results = []
    for image in images:
        progress.set_postfix(model=label)
        clock.seconds = 0.0
        masks, seconds = timed(lambda: generator.generate(image), device)
        results.append((masks, seconds, clock.seconds))
        progress.update()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="a real SAM (--model-type) and the generator's defaults")
    parser.add_argument("--model-type", default="vit_b", choices=sorted(sam_model_registry))
    parser.add_argument("--checkpoint", help="SAM checkpoint for --full (default: random weights)")
    parser.add_argument("--images", nargs="+", help="image files (default: synthetic images)")
    parser.add_argument("--num-images", type=int, default=3, help="synthetic images when --images is not given")
    parser.add_argument("--points-per-side", type=int, help="the generator's point grid (default: 8; --full: 32)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.full:
        sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint).eval()
        settings = FULL_GENERATOR
        size = (768, 1024)
    else:
        sam = small_sam()
        settings = SMALL_GENERATOR
        size = (96, 128)
    if args.points_per_side:
        settings = {**settings, "points_per_side": args.points_per_side}
    sam = sam.to(device)
    images = ([load_image(p) for p in args.images] if args.images
              else [synthetic_image(i, *size) for i in range(args.num_images)])
    clock = DecoderClock(sam.mask_decoder, device)
    generator = SamAutomaticMaskGenerator(sam, **settings)

    with torch.inference_mode(), tqdm(total=2 * len(images), desc="images", unit="image") as progress:
        upstream = run(generator, clock, images, device, progress, "segment_anything")
        report = mmfast.patch(sam)
        patched = run(generator, clock, images, device, progress, "mmfast")
        mmfast.unpatch(sam)
    print(report)
    rows = []
    for i, ((up_masks, up_s, up_dec), (mm_masks, mm_s, mm_dec)) in enumerate(zip(upstream, patched)):
        rows.append([i, f"{1e3 * up_s:.0f}", f"{1e3 * mm_s:.0f}", f"{1e3 * up_dec:.0f}", f"{1e3 * mm_dec:.0f}",
                     f"{up_dec / mm_dec:.2f}x" if mm_dec else "-"])
        identical, worst = compare_masks(mm_masks, up_masks)
        rows[-1] += [f"{identical}/{len(up_masks)}" + ("" if len(mm_masks) == len(up_masks) else f" ({len(mm_masks)})"),
                     worst]
    print_table(["image", "ms upstream", "ms mmfast", "decoder ms upstream", "decoder ms mmfast", "decoder speed-up",
                 "identical masks", "most pixels differing"], rows)
    return upstream, patched


if __name__ == "__main__":
    main()
