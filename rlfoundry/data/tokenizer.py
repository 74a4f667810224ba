"""Tokenizers through Hugging Face `tokenizers`: train a byte-level BPE on a corpus and save it, with
a GLM-4.5-style chat template, as a directory that transformers' AutoTokenizer loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

# GLM-4.5's chat format, reduced to plain messages: [gMASK]<sop><|role|>\ncontent ... <|assistant|>\n
SPECIAL_TOKENS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Like GLM-4.5, a turn ends when the model starts the next one or the text ends.
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE tokenizer (vocab_size >= 256 + the special tokens) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    return out


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint directory (None if it has none)."""
    path = Path(path)
    tokenizer_file, config_file, config = path / "tokenizer.json", path / "tokenizer_config.json", {}
    if not tokenizer_file.exists() and not config_file.exists():
        return None
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if (config.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend")
            and "auto_map" not in config and tokenizer_file.exists()):
        # what AutoTokenizer would build, without importing every auto class (~3 s of each engine's,
        # buffer's and rollout worker's start-up)
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_token_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn (those of EOS_TOKENS the tokenizer has, plus its eos)."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}
    ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)
