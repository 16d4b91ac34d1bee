"""Quality figures of a trained model on a labelled dataset (Fashion-MNIST, digits):

  (a) generation: samples for each class prompt, judged by a classifier trained on the REAL
      training split (its own test accuracy is reported too, and must be high for (a) to mean much);
  (b) understanding: the model's greedy answer to "What is this?" on held-out images names the
      right class;
  (c) held-out bits/dim of the flow: under the run's training noise, and in 'pixels' mode also on
      TarFlow's scale (uniform dequantisation; megaflow.train.evaluate);
  (d) interleaved consistency: in generated documents, the model's caption after each of its own
      images names the class the classifier sees in that image.

Used at the end of `megaflow train` (report.json, report.txt, samples.png) and by
tools/eval_quality.py on any checkpoint. The classifier is cached under data_cache/classifiers/.
The class prompts' samples (and the grids) come from ONE batched sampling call (`sample_prompts`),
each prompt's noise drawn from its own seed, so they are the images one call per prompt would give.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflow.model.generate import draw_noise, generate, sample_images, sample_text

log = logging.getLogger("megaflow")
CACHE = Path(__file__).resolve().parents[1] / "data_cache" / "classifiers"


# ----- real data in the model's geometry ------------------------------------------------------------
def real_images(source: str, split: str, image_size: int, channels: int):
    """(images (N, C, S, S) float in [-1, 1], labels (N,), class names), prepared like the data
    pipeline prepares them (centre-pad smaller images with black, resize larger ones)."""
    from data_pipeline.writers import load_digits_images, load_fashion_mnist
    data = load_fashion_mnist(split) if source == "fashion_mnist" else load_digits_images(split)
    x = torch.tensor(np.asarray(data.images), dtype=torch.float32)
    if x.dim() == 3:
        x = x[:, None]  # (N, 1, H, W)
    else:
        x = x.permute(0, 3, 1, 2)
    x = x / 127.5 - 1.0
    h = x.shape[-1]
    if h < image_size:
        p = image_size - h
        x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-1.0)
    elif h > image_size:
        # antialiased bicubic matches the PIL resize of the data pipeline (image_fit 'resize'); plain
        # bicubic aliases when downsampling, and the model would be judged on images it never saw
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(-1, 1)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1)
    return x, torch.tensor(np.asarray(data.labels), dtype=torch.long), list(data.class_names)


class Classifier(nn.Module):
    def __init__(self, channels: int, n_classes: int, size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, n_classes))

    def forward(self, x):
        return self.net(x)


def train_classifier(source: str, image_size: int, channels: int, epochs: int = 3, seed: int = 0):
    """A small CNN on the real training split; cached. Returns (classifier, test accuracy)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{source}_{image_size}px_{channels}ch_e{epochs}_s{seed}_aa.pt"
    x, y, names = real_images(source, "train", image_size, channels)
    xt, yt, _ = real_images(source, "test", image_size, channels)
    clf = Classifier(channels, len(names), image_size)
    if path.is_file():
        clf.load_state_dict(torch.load(path, weights_only=True))
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _fit(clf.to(dev), x.to(dev), y.to(dev), epochs, seed)
        clf.cpu()
        tmp = path.with_suffix(".tmp")
        torch.save(clf.state_dict(), tmp)
        tmp.replace(path)
    clf.eval()
    return clf, accuracy(clf, xt, yt)


@torch.enable_grad()
def _fit(clf, x, y, epochs: int, seed: int) -> None:
    """Adam with a one-cycle schedule, batch 128."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    steps = epochs * math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    clf.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).to(x.device).split(128):
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(clf, x, y) -> float:
    pred = torch.cat([clf(c).argmax(1) for c in x.split(512)])
    return float((pred == y).float().mean())


# ----- prompts in the data's own format -------------------------------------------------------------
def class_prompts(cfg, tok):
    """(class names, t2i prompt token ids per class, i2t question ids, expected answers) from the
    dataset's labels.json, or None for an unlabelled dataset."""
    from data_pipeline.writers import _article, _noun, load_class_names
    try:
        names = load_class_names(cfg.data.local)
    except FileNotFoundError:
        return None
    nouns = [_noun(n) for n in names]
    t2i = [[tok.bos_id] + tok.encode(f"a photo of {_article(n)}") for n in nouns]
    question = tok.encode("What is this?")
    answers = [_article(n) for n in nouns]
    answers = [a[0].upper() + a[1:] + "." for a in answers]
    return names, t2i, question, answers


def sample_prompts(model, prompts, per_prompt: int, guidance: float, temperature: float, seeds: list,
                   sampling: Optional[dict] = None) -> torch.Tensor:
    """(P, per_prompt, C, H, W) in [-1, 1]: every prompt's images in ONE batched sample_images call
    (a tenth of the sequential steps for 10 prompts; 1.4x faster on the CPU, docs/benchmarks.md).
    Prompt i's noise is what `sample_images(model, [p] * per_prompt, seed=seeds[i])` draws, so its
    images are those of that call (text prompts; left padding is never attended)."""
    fae = model.cfg.fae
    z = torch.cat([draw_noise(per_prompt, fae.n_tokens, fae.latent_dim, torch.Generator().manual_seed(s))
                   for s in seeds])  # (P * per_prompt, N, D)
    rows = [p for p in prompts for _ in range(per_prompt)]
    imgs, _ = sample_images(model, rows, guidance=guidance, temperature=temperature, seed=seeds[0], z=z,
                            **(sampling or {}))
    return imgs.view(len(prompts), per_prompt, *imgs.shape[1:])


def sample_grid(model, prompts, per_class: int, guidance: float, seed: int = 0,
                sampling: Optional[dict] = None) -> torch.Tensor:
    """Grid (C, rows*H, per_class*W) in [0, 1]: a row per prompt."""
    imgs = sample_prompts(model, prompts, per_class, guidance, 1.0, [seed * 1000 + i for i in range(len(prompts))],
                          sampling)
    rows = [torch.cat(list(row), dim=-1) for row in imgs]  # each (C, H, per_class*W)
    return (torch.cat(rows, dim=-2) + 1) / 2


def progress_grid(model, tok, cfg, step: int) -> Optional[torch.Tensor]:
    """The grid logged while training (4 samples per class prompt, seeded by the step), or None
    for an unlabelled dataset."""
    prompts = class_prompts(cfg, tok)
    if prompts is None:
        return None
    return sample_grid(model, prompts[1], per_class=4, guidance=cfg.train.guidance, seed=step)


def report_source(cfg) -> Optional[str]:
    """The labelled dataset the report judges against (fashion_mnist, digits), or None."""
    source = cfg.train.dataset or "fashion_mnist"
    return source if source in ("fashion_mnist", "digits") else None


def prepare_classifier(cfg) -> None:
    """Train and cache the report's classifier now, in one process, before other processes of the
    run read the cache (judge loads it)."""
    from data_pipeline.writers import load_class_names
    source = report_source(cfg)
    try:
        load_class_names(cfg.data.local)
    except FileNotFoundError:
        return
    if source is not None:
        train_classifier(source, cfg.model.fae.image_size, cfg.model.fae.channels)


def save_png(grid: torch.Tensor, path: Path, scale: int = 3) -> None:
    from PIL import Image
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)


def predicted_class(answer: str, answers: list) -> int:
    """Index of the expected answer the generated text starts with (longest match), or -1."""
    text = answer.strip().lower()
    best, best_len = -1, 0
    for i, a in enumerate(answers):
        key = a.lower().rstrip(".")
        if text.startswith(key) and len(key) > best_len:
            best, best_len = i, len(key)
    return best


def answer_token_budget(tok, answers: list) -> int:
    """Tokens to generate for an answer: the longest expected answer plus its end-of-document and one
    spare. (A fixed 8 once cut "A t-shirt/top." (10 tokens) and "An ankle boot." (9) short, so
    those two classes could never be judged right.)"""
    return max(len(tok.encode(a)) for a in answers) + 2


@torch.no_grad()
def interleaved_consistency(model, tok, clf, names: list, n_docs: int, guidance: float, temperature: float,
                            seed: int = 0, images_per_doc: int = 3, sampling: Optional[dict] = None) -> dict:
    """(d) Documents continued from "Here are some pictures." (the interleaved data's opening): each
    generated image is followed by the model's own caption ("This is a coat."); the figure is the
    fraction of captioned images whose caption names the class the classifier sees in the image.
    It needs both directions at once and the KV cache carrying a generated image into the text."""
    from data_pipeline.writers import _article, _noun
    captions = [f"This is {_article(_noun(n))}." for n in names]
    prompt = [tok.bos_id] + tok.encode("Here are some pictures.")
    per_image = answer_token_budget(tok, captions) + 1  # caption + its image-start
    agree = pairs = images = 0
    for d in range(n_docs):
        segs = generate(model, prompt, max_new_tokens=images_per_doc * per_image + 4, temperature=0.0,
                        image_temperature=temperature, guidance=guidance, seed=seed * 1000 + d,
                        max_images=images_per_doc, **(sampling or {}))
        for i, seg in enumerate(segs):
            if not torch.is_tensor(seg):
                continue
            images += 1
            text = []
            for t in segs[i + 1:]:
                if torch.is_tensor(t) or t in (tok.boi_id, tok.eos_id):
                    break
                if t != tok.eoi_id:
                    text.append(t)
            said = predicted_class(tok.decode(text), captions)
            if said >= 0:
                pairs += 1
                agree += int(said == int(clf(seg[None].float().cpu()).argmax(1)))
    return {"interleaved_consistency": agree / max(pairs, 1), "interleaved_captioned": pairs,
            "interleaved_images": images, "interleaved_docs": n_docs}


@torch.no_grad()
def judge(model, tok, cfg, device, per_class: int = 10, n_images: int = 200, guidance: float = 2.0,
          seed: int = 0, source: str = "fashion_mnist", temperature: float = 1.0, n_docs: int = 0,
          sampling: Optional[dict] = None) -> dict:
    """The three quality figures (a), (b) and the classifier's own accuracy; (c) comes from evaluate().
    `sampling`: keywords of sample_images/generate (method, tol, chunk, graphs); default: sequential
    with static KV caches, one-token steps as CUDA graphs on a GPU (megaflow/model/generate.py)."""
    model.eval()
    fae = model.cfg.fae
    found = class_prompts(cfg, tok)
    if found is None:
        return {}
    names, t2i, question, answers = found
    clf, clf_acc = train_classifier(source, fae.image_size, fae.channels)
    out = {"classifier_test_accuracy": clf_acc, "guidance": guidance, "temperature": temperature,
           "samples_per_class": per_class, "sampling_method": (sampling or {}).get("method", "sequential")}
    t0 = time.time()
    per, grids = [], []
    all_imgs = sample_prompts(model, t2i, per_class, guidance, temperature,
                              [seed * 1000 + c for c in range(len(t2i))], sampling)
    for c, imgs in enumerate(all_imgs):
        per.append(float((clf(imgs.float().cpu()).argmax(1) == c).float().mean()))
        grids.append(torch.cat(list(imgs.float().cpu()), dim=-1))
    out["generation_accuracy"] = sum(per) / len(per)
    out["generation_accuracy_per_class"] = dict(zip(names, per))
    out["grid"] = (torch.cat(grids, dim=-2) + 1) / 2
    out["generation_seconds"] = time.time() - t0
    if model.cfg.vlm is not None and n_images > 0:
        x, y, _ = real_images(source, "test", fae.image_size, fae.channels)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(x), generator=g)[:n_images]
        correct, examples = 0, []
        budget = answer_token_budget(tok, answers)
        for chunk in idx.split(50):
            prompts = [[tok.bos_id, x[i].to(device)] + question for i in chunk.tolist()]
            outs = sample_text(model, prompts, max_new_tokens=budget, temperature=0.0, seed=seed,
                               graphs=(sampling or {}).get("graphs"))
            for i, ids in zip(chunk.tolist(), outs):
                text = tok.decode(ids)
                ok = predicted_class(text, answers) == int(y[i])
                correct += ok
                if len(examples) < 10:
                    examples.append({"label": names[int(y[i])], "answer": text, "correct": bool(ok)})
        out["understanding_accuracy"] = correct / len(idx)
        out["understanding_examples"] = examples
    if model.cfg.vlm is not None and n_docs > 0:
        out.update(interleaved_consistency(model, tok, clf, names, n_docs, guidance, temperature, seed,
                                           sampling=sampling))
    return out


def bits_label(mcfg) -> str:
    """What the run's `bits_per_dim` figure is (megaflow.train.evaluate), for the report."""
    f = mcfg.flow
    if mcfg.fae.mode != "pixels":
        return "FAE latents: continuous NLL, not comparable with pixel bits/dim"
    if f.dequantization == "uniform":
        return "uniform dequantisation, TarFlow scale"
    return f"continuous NLL under Gaussian noise sigma {f.noise_std} + log 128: not TarFlow's scale"


def write_report(model, tok, cfg, out: Path, device, monitor=None, sampling: Optional[dict] = None,
                 write: bool = True) -> dict:
    """report.json, report.txt and samples.png (a row per class prompt) in the run's directory;
    `sampling` as in judge. A model split over processes (parallel/sampling.py): every rank that
    takes part calls it and gets the figures; only the one with `write` writes the files."""
    tcfg = cfg.train
    source = report_source(cfg)
    if source is None:
        if write:
            log.info("no quality report: it needs a labelled dataset with a real-data classifier (fashion_mnist, "
                     "digits)")
        return {}
    res = judge(model, tok, cfg, device, tcfg.report_samples, tcfg.report_images, tcfg.guidance, tcfg.seed, source,
                tcfg.sample_temperature, tcfg.report_docs, sampling)
    if not res or not write:
        res.pop("grid", None)
        return res
    grid = res.pop("grid")
    save_png(grid, out / "samples.png")
    if monitor is not None:
        monitor.image_grid("report/samples", grid, tcfg.steps)
        res["test"] = getattr(monitor, "last_eval", {})
    (out / "report.json").write_text(json.dumps(res, indent=1))
    lines = [f"megaflow quality report ({source}, {tcfg.steps} steps)",
             f"classifier (real {source} train split) test accuracy: {res['classifier_test_accuracy']:.3f}",
             f"(a) generation: {res['generation_accuracy']:.3f} of samples classified as the prompted class "
             f"({res['samples_per_class']} per class, guidance {res['guidance']}, temperature {res['temperature']})"]
    if "understanding_accuracy" in res:
        lines.append(f"(b) understanding: {res['understanding_accuracy']:.3f} of answers name the right class")
    if "interleaved_consistency" in res:
        lines.append(f"(d) interleaved: {res['interleaved_consistency']:.3f} of generated images are captioned as the "
                     f"classifier sees them ({res['interleaved_captioned']} captioned of {res['interleaved_images']} "
                     f"images in {res['interleaved_docs']} documents)")
    if res.get("test"):
        lines.append(f"(c) held-out bits/dim: {res['test'].get('bits_per_dim', float('nan')):.4f} "
                     f"({bits_label(model.cfg)})   text loss: {res['test'].get('text_loss', float('nan')):.4f}")
        if "bits_per_dim_tarflow" in res["test"]:
            lines.append(f"(c) held-out bits/dim (uniform dequantisation, TarFlow scale): "
                         f"{res['test']['bits_per_dim_tarflow']:.4f}")
    lines.append("per class: " + ", ".join(f"{k} {v:.2f}" for k, v in res["generation_accuracy_per_class"].items()))
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res
