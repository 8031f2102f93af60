"""Deterministic byte-level BPE tokenizer with the Qwen special tokens, trained offline.

Used by jaxrl_vl/models/tiny_checkpoint.py (tools/make_tiny_model.py). The corpus is synthetic and seeded (English text of the kind the
envs produce, chat boilerplate, tags such as `<action>left</action>`, numbers, JSON tool calls,
LaTeX). Byte-level BPE can express any text whatever the merges; the merges only make the text the
envs use short. Training runs single-threaded so the merges (and the file bytes) never change.
"""
import os
import random

# Order as in Qwen2/2.5/3-VL (ids 151643..151668 there; here they follow the BPE vocabulary).
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN_BASE_VOCAB_SIZE = 151643  # the real models' BPE vocabulary; added tokens start here

# The Qwen2 pre-tokenizer split (digits one by one, words with a leading space, punctuation runs).
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = """the a an is are was be to of and in on at for with from by as it this that you your we
our they their not no yes if then else when which what where who how all any each one two three
four five six seven eight nine ten step steps turn turns move moves left right up down stop wall
walls path paths maze grid cell cells agent target goal reach reached red blue green white gray
black yellow circle square triangle line angle length area ratio point points image images picture
shown below above find answer question problem solve reason reasoning think final result value
values number numbers count total sum product difference equal equals greater less than more
environment feedback action actions executed successfully cannot into allowed take took remaining
position row column north south east west start end done success failure reward episode game
You are navigating a maze consists of represented by and your is to the square Respond with exactly
tool tools function functions call calls calling name arguments argument parameters properties
type object string integer boolean array required description result results response query
helpful assistant user system please help sure here let me check calculate compute score degrees
triangle circle radius diameter perimeter side sides measure find x y z m n AB BC CA ABC""".split()
_TAGS = ("action", "think", "answer", "observation", "justification", "tool_call", "tools")
_TOOL_NAMES = ("calc_score", "calculator", "move", "get_weather", "search", "zoom", "python")


def _synthetic_lines(rng: random.Random, num_lines: int) -> list[str]:
    """Seeded synthetic corpus: mixes prose, tags, numbers, JSON and LaTeX, one snippet a line."""
    lines = []
    for _ in range(num_lines):
        kind = rng.randrange(8)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
        if kind <= 2:
            lines.append(words.capitalize() + rng.choice([".", "?", "!", ":", ","]))
        elif kind == 3:
            tag = rng.choice(_TAGS)
            inner = rng.choice(["left", "right", "up", "down", "stop", words, str(rng.randint(0, 999))])
            lines.append(f"<{tag}>{inner}</{tag}>")
        elif kind == 4:
            name = rng.choice(_TOOL_NAMES)
            value = rng.choice([str(rng.randint(-99, 9999)), f"{rng.uniform(-50, 50):.2f}", words])
            lines.append('{"name": "%s", "arguments": {"answer": "%s", "x": %d}}' % (name, value, rng.randint(0, 99)))
        elif kind == 5:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            lines.append(rng.choice([f"\\boxed{{{a}}}", f"\\frac{{{a}}}{{{b}}}", f"{a} + {b} = {a + b}",
                                     f"\\sqrt{{{a}}}", f"m \\angle ABC = {a}^\\circ", f"x = {a}.{b}"]))
        elif kind == 6:
            lines.append(f"This is step {rng.randint(1, 30)}. You are allowed to take {rng.randint(0, 30)} more steps.")
        else:
            lines.append(rng.choice(["Action executed successfully.", "Cannot move into a wall.",
                                     "Environment feedback: " + words, "('move', %d)" % rng.randint(0, 3),
                                     "('stop', 'stop')", '{"type": "object", "properties": {}, "required": []}']))
    return lines


def train_tokenizer(num_bpe_tokens: int, seed: int, pad_base_vocab_to: int | None = None):
    """Returns a `tokenizers.Tokenizer`: byte-level BPE with `num_bpe_tokens` entries (256 bytes +
    merges), then the Qwen added tokens. With `pad_base_vocab_to` (e.g. 151643), unreachable filler
    entries pad the BPE vocabulary so the added tokens get the real Qwen ids (151643...)."""
    # Single-threaded training keeps merge order, and so the bytes written, identical every run.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def empty_tokenizer(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok

    tok = empty_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=num_bpe_tokens, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_synthetic_lines(random.Random(seed), 20000), trainer=trainer)
    if pad_base_vocab_to is not None:
        vocab = tok.get_vocab()
        if len(vocab) > pad_base_vocab_to:
            raise ValueError(f"pad_base_vocab_to={pad_base_vocab_to} is below the trained vocabulary ({len(vocab)})")
        # Entries that no merge produces are never emitted; they only move the added tokens' ids.
        vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), pad_base_vocab_to)})
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                  for m in _trained_merges(tok)]
        tok = empty_tokenizer(models.BPE(vocab=vocab, merges=merges))
    for content, special in QWEN_ADDED_TOKENS:  # one at a time: ids follow this order
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok


def _trained_merges(tok) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]
