"""Zero-shot classification with prompt ensembling and top-k: mmfast.nn.ZeroShotClassifier against open_clip's.

    python examples/zero_shot.py                  # a small random open_clip model, 100 ImageNet classes x 7 prompts
    python examples/zero_shot.py --full --pretrained laion2b_s34b_b79k --images cat.jpg dog.jpg   # ViT-B-32, GPU
    python examples/zero_shot.py --image-features img.pt --text-features txt.pt --class-names names.txt \\
        --labels labels.pt                        # your own embeddings: [N, D] and [C, T, D] (or [C, D])

With a model, the class embeddings are open_clip's text embeddings of every (class, template) prompt, [C, T, D];
mmfast's classifier ensembles them (normalize each, mean over templates, renormalize) and open_clip's
build_zero_shot_classifier does the same on its own, so the two top-k predictions are compared. With your
files, the comparison is plain PyTorch on the same class weights. Then both classify a large batch of image
embeddings (--timing-batch) for time and peak memory: mmfast's fused softmax + top-k never holds the N x C
probabilities. Random weights make the predicted classes meaningless, not the comparison.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import median_ms, mib, peak_memory, pick_device, print_table, timed

import mmfast  # noqa: E402  (after common, which makes a checkout importable)
import open_clip  # noqa: E402
from clip_train import small_clip  # noqa: E402
from mmfast.nn.similarity_softmax import build_class_weights  # noqa: E402

SCALE = 100.0  # CLIP's exponentiated logit scale


def encode_prompts(model, tokenizer, classnames, templates, device, batch_classes=10) -> torch.Tensor:
    """[C, T, D] text embeddings of every template filled with every class name."""
    chunks = []
    for start in tqdm(range(0, len(classnames), batch_classes), desc="class prompts", unit="batch"):
        names = classnames[start:start + batch_classes]
        texts = [template(c) if callable(template) else template.format(c) for c in names for template in templates]
        chunks.append(model.encode_text(tokenizer(texts).to(device)).reshape(len(names), len(templates), -1))
    return torch.cat(chunks)


def encode_images(model, images, device, batch=64) -> torch.Tensor:
    return torch.cat([model.encode_image(images[i:i + batch].to(device))
                      for i in tqdm(range(0, len(images), batch), desc="images", unit="batch")])


def reference_topk(image_features, classifier_dc, k):
    """open_clip's zero-shot evaluation: softmax(100 * normalize(image) @ classifier [D, C]), then top-k."""
    return (SCALE * F.normalize(image_features, dim=-1) @ classifier_dc).softmax(dim=-1).topk(k, dim=-1)


def from_model(args, device):
    """(image features [N, D], class embeddings [C, T, D], open_clip's classifier [D, C], class names)."""
    if args.full:
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=args.pretrained)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        classnames, templates = list(open_clip.IMAGENET_CLASSNAMES), open_clip.OPENAI_IMAGENET_TEMPLATES
    else:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
        torch.manual_seed(0)
        model = small_clip(context_length=16, vocab_size=tokenizer.vocab_size)
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
        classnames, templates = list(open_clip.IMAGENET_CLASSNAMES[:100]), open_clip.SIMPLE_IMAGENET_TEMPLATES
    if args.num_classes:
        classnames = classnames[:args.num_classes]
    model = model.to(device).eval()
    if args.images:
        from PIL import Image

        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in args.images])
    else:
        size = model.visual.image_size
        images = torch.rand(args.num_images, 3, *(size if isinstance(size, tuple) else (size, size)),
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        class_embeddings = encode_prompts(model, tokenizer, classnames, templates, device)
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device)
        image_features = encode_images(model, images, device)
    return image_features, class_embeddings, classifier, classnames


def from_files(args, device):
    image_features = torch.load(args.image_features, map_location=device)
    class_embeddings = torch.load(args.text_features, map_location=device)
    if args.class_names:
        with open(args.class_names) as f:
            classnames = [line.strip() for line in f if line.strip()]
    else:
        classnames = [f"class {i}" for i in range(class_embeddings.shape[0])]
    if len(classnames) != class_embeddings.shape[0]:
        raise SystemExit(f"--class-names has {len(classnames)} names but --text-features has "
                         f"{class_embeddings.shape[0]} classes")
    # No open_clip model here: the reference is plain PyTorch on the same ensembled weights.
    classifier = build_class_weights(class_embeddings).T
    return image_features, class_embeddings, classifier, classnames


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ViT-B-32, 1000 ImageNet classes x 80 prompts")
    parser.add_argument("--pretrained", help="open_clip pretrained tag for --full (downloads; default: random)")
    parser.add_argument("--images", nargs="+", help="image files (default: random images)")
    parser.add_argument("--num-images", type=int, default=32, help="random images when --images is not given")
    parser.add_argument("--num-classes", type=int, help="only the first classes")
    parser.add_argument("--image-features", help="[N, D] tensor file (torch.save) instead of a model")
    parser.add_argument("--text-features", help="[C, T, D] or [C, D] tensor file, with --image-features")
    parser.add_argument("--class-names", help="text file, one class name a line, with --text-features")
    parser.add_argument("--labels", help="[N] tensor file of class indices: prints top-1 / top-k accuracy")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--timing-batch", type=int, help="image embeddings classified for timing "
                        "(default 8192; --full 131072)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if (args.image_features is None) != (args.text_features is None):
        parser.error("--image-features and --text-features go together")
    device = pick_device(args.device)
    load = from_files if args.image_features else from_model
    image_features, class_embeddings, classifier, classnames = load(args, device)
    k = min(args.topk, len(classnames))
    reference = "PyTorch" if args.image_features else "open_clip"

    clf = mmfast.nn.ZeroShotClassifier(class_embeddings, logit_scale=SCALE).to(device)
    probs, top = clf(image_features, topk=k)
    ref_probs, ref_top = reference_topk(image_features, classifier.to(image_features.dtype), k)
    agree = (top == ref_top).float().mean().item()
    print(f"{len(classnames)} classes x {class_embeddings.shape[1] if class_embeddings.dim() == 3 else 1} prompts, "
          f"{len(image_features)} images: top-{k} classes agree with {reference}'s on {agree:.1%} "
          f"(max probability difference {(probs - ref_probs).abs().max().item():.1e})")
    for i in range(min(3, len(image_features))):
        print(f"  image {i}: " + ", ".join(f"{classnames[c]} {p:.3f}" for p, c in zip(probs[i].tolist(),
                                                                                 top[i].tolist())))
    if args.labels:
        labels = torch.load(args.labels, map_location=device)
        print(f"top-1 accuracy {(top[:, 0] == labels).float().mean().item():.2%}, top-{k} accuracy "
              f"{(top == labels[:, None]).any(dim=1).float().mean().item():.2%}")

    n = args.timing_batch or (131072 if args.full else 8192)
    many = torch.randn(n, image_features.shape[1], generator=torch.Generator().manual_seed(1)).to(device,
                                                                                                 image_features.dtype)
    rows = []
    with torch.no_grad():
        for name, fn in ((reference, lambda: reference_topk(many, classifier.to(many.dtype), k)),
                         ("mmfast", lambda: clf(many, topk=k))):
            fn()  # warm-up
            seconds = [timed(fn, device)[1] for _ in range(5)]
            _, peak = peak_memory(fn, device)
            rows.append([name, f"{median_ms(seconds):.1f}", mib(peak)])
    print(f"classifying {n} image embeddings into {len(classnames)} classes, top-{k}:")
    print_table(["", "median ms of 5", "peak memory"], rows)
    return agree, rows


if __name__ == "__main__":
    main()
