"""The quality judge's understanding figure: every class's expected answer fits the token budget it
generates with, so no class is judged wrong by construction (a fixed 8-token budget once cut
"A t-shirt/top." and "An ankle boot." short, which capped the default's figure at 0.8)."""
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.writers import DIGIT_CLASSES, FASHION_MNIST_CLASSES, _article, _noun
from megaflow.config import load_config
from megaflow.quality import answer_token_budget, predicted_class
from tests.train.conftest import TINY


def _answers(names):
    out = [_article(_noun(n)) for n in names]
    return [a[0].upper() + a[1:] + "." for a in out]


def test_every_answer_fits_the_budget_and_is_judged_right(tiny_sets):
    tok = load_tokenizer(load_config(str(TINY), tiny_sets).data.tokenizer)  # a small-vocabulary model
    for names in (FASHION_MNIST_CLASSES, DIGIT_CLASSES):
        answers = _answers(names)
        budget = answer_token_budget(tok, answers)
        lengths = [len(tok.encode(a)) for a in answers]
        assert budget >= max(lengths) + 1, "no room for the end-of-document token"
        for i, a in enumerate(answers):
            cut = tok.decode(tok.encode(a)[:budget] + [tok.eos_id])
            assert predicted_class(cut, answers) == i, (a, cut)
    fashion = [len(tok.encode(a)) for a in _answers(FASHION_MNIST_CLASSES)]
    assert max(fashion) > 8, "the answers are all short here: the test would not catch the old cut"


def test_predicted_class_takes_the_longest_matching_answer():
    answers = _answers(FASHION_MNIST_CLASSES)
    assert predicted_class("A shirt.", answers) == FASHION_MNIST_CLASSES.index("Shirt")
    assert predicted_class("A t-shirt/top.", answers) == FASHION_MNIST_CLASSES.index("T-shirt/top")
    assert predicted_class("An ankle boot.", answers) == FASHION_MNIST_CLASSES.index("Ankle boot")
    assert predicted_class("A t-shirt/to", answers) == -1
    assert predicted_class("Nothing.", answers) == -1


def test_interleaved_consistency_pairs_each_image_with_the_caption_after_it(tiny_sets, monkeypatch):
    """(d): the caption that follows a generated image is compared with the classifier's class of that
    image; images without a caption count as images but not as pairs."""
    import torch
    import megaflow.quality as quality
    tok = load_tokenizer(load_config(str(TINY), tiny_sets).data.tokenizer)
    names = FASHION_MNIST_CLASSES
    coat, bag, shirt = (torch.full((1, 4, 4), v) for v in (0.1, 0.2, 0.3))
    said = {0.1: names.index("Coat"), 0.2: names.index("Shirt"), 0.3: names.index("Shirt")}

    def fake_generate(model, prompt, **kw):
        return ([tok.boi_id, coat, tok.eoi_id] + tok.encode("This is a coat.") +
                [tok.boi_id, bag, tok.eoi_id] + tok.encode("This is a bag.") +
                [tok.boi_id, shirt, tok.eoi_id, tok.eos_id])

    class Clf:
        def __call__(self, x):
            out = torch.zeros(x.shape[0], len(names))
            out[0, said[round(float(x[0, 0, 0, 0]), 1)]] = 1.0
            return out

    monkeypatch.setattr(quality, "generate", fake_generate)
    res = quality.interleaved_consistency(None, tok, Clf(), names, n_docs=2, guidance=0.0, temperature=1.0)
    assert res == {"interleaved_consistency": 0.5, "interleaved_captioned": 4, "interleaved_images": 6,
                   "interleaved_docs": 2}
