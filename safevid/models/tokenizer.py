"""A sentencepiece BPE tokenizer trained on the fly, saved in transformers format.

BPE rather than unigram: a unigram model gets different ids after the transformers conversion.
The model file must be saved as `tokenizer.model` and loaded from its directory; passing
`vocab_file=` directly silently yields a 3-token vocabulary.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"

# The LLaVA-NeXT-Video prompt layout ("USER: <video>\n... ASSISTANT: ..."), accepting both plain
# string content and the content-list form that the real model's processor template uses.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ eos_token + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024, *,
                    specials: list[str] | None = None, chat_template: str | None = None):
    """Train a BPE model on `texts`, save it as a transformers tokenizer in `out_dir`, return it.

    `specials` are kept whole by the model and registered as special tokens (default: LLaVA's
    <video> and <image>); `chat_template` defaults to the LLaVA-NeXT-Video layout."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = [VIDEO_TOKEN, IMAGE_TOKEN] if specials is None else list(specials)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=3,
        pad_piece="<pad>",
        user_defined_symbols=specials,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=True, legacy=False)
    # Registered as special tokens so that no pre-tokenizer ever splits them.
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.pad_token = "<pad>"
    tok.chat_template = CHAT_TEMPLATE if chat_template is None else chat_template
    tok.save_pretrained(str(out_dir))
    return tok
