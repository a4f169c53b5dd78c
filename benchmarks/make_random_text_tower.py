"""A RoBERTa-base-sized text tower with random weights, as a local Hugging Face folder.

    python benchmarks/make_random_text_tower.py FOLDER --config-only   # config.json + tokenizer (small)
    python benchmarks/make_random_text_tower.py FOLDER                 # + model.safetensors (~500 MB)

For timing runs where no pretrained RoBERTa can be downloaded: the sizes are roberta-base's, so
the compute and memory match; the weights are random (fixed seed) and the tokenizer is a small
byte-level BPE trained here on generated sound descriptions, with RoBERTa's special tokens and
ids. The weights are written separately (on the machine that runs the benchmark) because the
config and tokenizer are small enough to carry around and the weights are not.
Each step is skipped when its files already exist.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

SEED = 0
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as in roberta-base
TOKENIZER_VOCAB = 4000  # upper bound; the small corpus may end with fewer tokens

ROBERTA_BASE = dict(
    architectures=["RobertaModel"],
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=50265,  # the real vocabulary's size: the embedding table costs what roberta-base's does
    max_position_embeddings=514,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    layer_norm_eps=1e-5,
)

SOURCES = {
    "a dog": ["barking", "growling", "whimpering", "howling", "panting"],
    "a cat": ["meowing", "purring", "hissing"],
    "a man": ["speaking", "laughing", "coughing", "shouting", "whistling", "singing"],
    "a woman": ["speaking", "laughing", "singing", "whispering", "sneezing"],
    "a child": ["crying", "giggling", "screaming", "talking"],
    "a baby": ["crying", "babbling", "laughing"],
    "birds": ["chirping", "singing", "tweeting", "flapping their wings"],
    "a rooster": ["crowing"],
    "a cow": ["mooing"],
    "a horse": ["neighing", "galloping", "trotting"],
    "frogs": ["croaking"],
    "insects": ["buzzing", "chirping"],
    "a car": ["passing by", "honking", "accelerating", "idling", "braking"],
    "a truck": ["rumbling", "reversing with a beeping alarm", "passing by"],
    "a motorcycle": ["revving", "accelerating", "passing by"],
    "a train": ["passing", "blowing its horn", "clattering over the tracks"],
    "an airplane": ["flying overhead", "taking off"],
    "a helicopter": ["hovering", "flying past"],
    "a siren": ["wailing", "blaring"],
    "a bell": ["ringing", "tolling", "chiming"],
    "a phone": ["ringing", "vibrating"],
    "an alarm clock": ["beeping", "ringing"],
    "a door": ["slamming", "creaking", "being knocked on", "closing"],
    "footsteps": ["echoing", "walking on gravel", "running on wood"],
    "water": ["running", "dripping", "splashing", "flowing in a stream", "boiling"],
    "rain": ["falling", "pattering on a roof", "pouring"],
    "thunder": ["rumbling", "cracking"],
    "wind": ["blowing", "howling", "rustling leaves"],
    "waves": ["crashing", "lapping on the shore"],
    "a fire": ["crackling"],
    "a guitar": ["being strummed", "playing a melody"],
    "a piano": ["playing", "playing chords"],
    "drums": ["playing a beat", "being hit"],
    "a violin": ["playing"],
    "a crowd": ["cheering", "applauding", "chattering", "murmuring"],
    "people": ["talking", "clapping", "laughing"],
    "a vacuum cleaner": ["running", "humming"],
    "a blender": ["whirring"],
    "a drill": ["drilling", "whining"],
    "a hammer": ["hammering", "tapping"],
    "a saw": ["cutting wood", "buzzing"],
    "an engine": ["starting", "idling", "sputtering"],
    "a clock": ["ticking"],
    "keys": ["jingling"],
    "a keyboard": ["typing", "clicking"],
    "dishes": ["clattering", "clinking"],
    "paper": ["crumpling", "rustling"],
    "a toilet": ["flushing"],
    "a microwave": ["humming", "beeping"],
}
PLACES = [
    "", "in the distance", "nearby", "outdoors", "indoors", "in a small room", "in a large hall",
    "on a busy street", "in the background", "in a forest", "at the beach", "in a kitchen",
    "in an office", "at night", "in the rain", "loudly", "softly", "repeatedly", "twice",
]
LINKS = ["while", "and then", "followed by", "as", "before", "after that", "and at the same time"]
# The shapes of the synthetic captions (finelap.synth.captions), so their words are single tokens.
CAPTIONS = [
    "{} is heard", "{} sounds", "{} can be heard", "you can hear {}", "{} is heard twice",
    "{} sounds three times in a row", "then {} can be heard two times", "with {} in the background",
    "over {}", "while {} continues in the background", "against a background of {}",
]
NOISES = ["pink noise", "white noise", "brown noise", "static", "traffic", "music", "speech", "babble",
          "an engine hum", "a crackle", "a tone", "a chirp", "a buzzer", "a whistle", "clicks", "knocks"]


def corpus() -> list[str]:
    """A few thousand deterministic sound descriptions (single events, places, pairs, captions)."""
    events = [f"{source} {action}" for source, actions in SOURCES.items() for action in actions]
    lines = [f"{event} {place}".strip() for event, place in itertools.product(events, PLACES)]
    for index, (first, second) in enumerate(itertools.combinations(events, 2)):
        if index % 7 == 0:
            link = LINKS[index % len(LINKS)]
            lines.append(f"{first[0].upper()}{first[1:]} {link} {second}.")
    sounds = NOISES + list(SOURCES)
    lines += [template.format(sound) for template, sound in itertools.product(CAPTIONS, sounds)]
    return lines


def write_config_and_tokenizer(folder: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import AutoTokenizer, RobertaConfig

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():
        RobertaConfig(**ROBERTA_BASE).save_pretrained(folder)
    if not (folder / "tokenizer_config.json").exists():
        # Built with `tokenizers` alone and a hand-written tokenizer_config.json: the constructors
        # of transformers' RoBERTa tokenizers differ between releases, these files do not.
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus(), vocab_size=TOKENIZER_VOCAB, min_frequency=2,
                                special_tokens=SPECIAL_TOKENS, show_progress=False)
        bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)  # <s> text </s>
        bpe.save_model(str(folder))  # vocab.json + merges.txt, for slow-tokenizer loaders
        bpe.save(str(folder / "tokenizer.json"))
        tokenizer_config = dict(
            tokenizer_class="RobertaTokenizer", model_max_length=512, add_prefix_space=False,
            errors="replace", trim_offsets=True, bos_token="<s>", cls_token="<s>", eos_token="</s>",
            sep_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        )
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise SystemExit(f"{folder}: special token ids {ids}, expected 0..4")
    print(f"{folder}: tokenizer of {len(tokenizer)} tokens; 'a dog barking' -> {tokenizer('a dog barking')['input_ids']}")


def write_weights(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModel

    if (folder / "model.safetensors").exists():
        return
    torch.manual_seed(SEED)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    model.save_pretrained(folder)  # safetensors, one file
    count = sum(parameter.numel() for parameter in model.parameters())
    print(f"{folder}: {count / 1e6:.1f}M random parameters (seed {SEED})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--config-only", action="store_true", help="write config.json and the tokenizer, not the weights")
    args = parser.parse_args()
    write_config_and_tokenizer(args.folder)
    if not args.config_only:
        write_weights(args.folder)


if __name__ == "__main__":
    main()
