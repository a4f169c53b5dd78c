"""Captions for synthetic mixtures: rule-based by default, or any callable a user plugs in.

A captioner is `captioner(events) -> str`. `events` lists the mixture's
sounds as dicts, foreground events in order of first onset, then the background:
    {"label": str,        the SED label (the phrase in the metadata)
     "name": str,         how to call it in words (the label or one of its alternatives)
     "role": "event" | "background",
     "segments": [[onset_s, offset_s], ...],   this event's placements (the whole clip for the background)
     "snr_db": float | None}                   drawn SNR over the background (None for the background)
A user with a language model writes such a function in a module of their own
and passes `--captioner package.module:function`.
"""
from __future__ import annotations

import importlib
import json
import zlib
from typing import Callable

import numpy as np

from finelap.synth.errors import SynthError

Captioner = Callable[[list[dict]], str]

_MASS_NOUNS = {"noise", "babble", "music", "speech", "rain", "wind", "water", "traffic", "static", "crackle"}
_FIRST = ("{sound} is heard{times}", "{sound} sounds{times}", "{sound} can be heard{times}", "you can hear {sound}{times}")
_AFTER = (
    "then {sound} is heard{times}",
    "followed by {sound}{times}",
    "after that {sound} sounds{times}",
    "and then {sound} can be heard{times}",
)
_DURING = ("while {sound} sounds{times}", "as {sound} is heard{times}", "and at the same time {sound} can be heard{times}")
_BACKGROUND = (
    "with {sound} in the background",
    "over {sound}",
    "while {sound} continues in the background",
    "against a background of {sound}",
)
_TIMES = {1: ("",), 2: (" twice", " two times"), 3: (" three times", " three times in a row")}


def spoken(name: str) -> str:
    """How a name reads inside a sentence: lower case, underscores as spaces."""
    return " ".join(name.replace("_", " ").lower().split())


def noun_phrase(name: str) -> str:
    """'bell' -> 'a bell', 'engine hum' -> 'an engine hum'; gerunds, plurals and mass nouns take no article."""
    text = spoken(name)
    last = text.split()[-1]
    if last.endswith("ing") or last in _MASS_NOUNS or (last.endswith("s") and not last.endswith("ss")):
        return text
    return ("an " if text[0] in "aeiou" else "a ") + text


def rule_based_caption(events: list[dict]) -> str:
    """'A bell is heard twice, then a siren sounds, with pink noise in the background.'

    Mentions every foreground event in the order given (their temporal order)
    and the background last. Wording varies from mixture to mixture but is a
    function of `events` only, so captions are reproducible.
    """
    rng = np.random.default_rng(zlib.crc32(json.dumps(events, sort_keys=True).encode()))

    def pick(options):
        return options[int(rng.integers(len(options)))]

    foreground = [event for event in events if event["role"] == "event"]
    clauses = []
    for number, event in enumerate(foreground):
        count = len(event["segments"])
        times = pick(_TIMES.get(count, (" repeatedly",)))
        if number == 0:
            template = pick(_FIRST)
        else:
            onset = event["segments"][0][0]
            previous = foreground[number - 1]["segments"]
            overlapping = any(start <= onset < end for start, end in previous)
            template = pick(_DURING if overlapping else _AFTER)
        clauses.append(template.format(sound=noun_phrase(event["name"]), times=times))
    clauses += [pick(_BACKGROUND).format(sound=noun_phrase(e["name"])) for e in events if e["role"] == "background"]
    caption = ", ".join(clauses)
    return caption[0].upper() + caption[1:] + "."


def load_captioner(spec: str | None) -> Captioner:
    """The rule-based captioner for None, else the callable named 'package.module:attribute'."""
    if spec is None:
        return rule_based_caption
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SynthError(f"--captioner {spec!r}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SynthError(f"--captioner {spec!r}: cannot import module {module_name!r}: {error}") from None
    captioner = getattr(module, attribute, None)
    if not callable(captioner):
        raise SynthError(f"--captioner {spec!r}: {module_name} has no callable {attribute!r}")
    return captioner
