"""Built-in procedural sound bank: event classes and background types, made from numbers.

No dataset can be downloaded, so the demo and the tests mix sounds that are
synthesised here, deterministically from (seed, class, variation). Each event
class is acoustically distinct (tones at three pitch ranges, sweeps, an FM
siren, click trains, band-passed noise, a plucked string, an engine-like hum,
knocks, an inharmonic bell, formant babble, ...), has a cluster name and 1-3
alternative names, and comes in several variations. The last quarter of the
variations (at least one) form the "eval" split, the rest "train", so
held-out sets share no source sound with training.

Bank folder layout (paths in the indexes are relative to the folder):
    events/<class>/<class>_<v>.wav      event clips, PCM 16-bit, silence around each sound
    backgrounds/<type>_<v>.wav          stationary backgrounds
    events_{train,eval,all}.jsonl       {"path": ..., "label": cluster name}
    backgrounds_{train,eval,all}.jsonl  {"path": ..., "label": background name}
    phrase_bank.jsonl                   {"phrase": cluster name, "alternatives": [...]}
    bank.json                           the parameters; written last (marks a complete bank)
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from finelap.synth.files import write_text_atomic, write_wav_atomic

SPLITS = ("train", "eval", "all")
EVAL_SHARE = 4  # the last 1/EVAL_SHARE of the variations (at least one) are held out for evaluation
NOISE_FLOOR_DB = -75.0  # dither under every event clip, relative to its peak: far below any trim threshold

Generator = Callable[[np.random.Generator, int], np.ndarray]


@dataclass(frozen=True)
class SoundClass:
    """One procedural sound: `name` is the cluster name (the label), `alternatives` its synonyms."""

    name: str
    alternatives: tuple[str, ...]
    generate: Generator  # (rng, sample_rate) -> [S] float64 sound, no silence around it


@dataclass(frozen=True)
class BankSettings:
    sample_rate: int = 16000
    variations: int = 12  # per event class
    background_variations: int = 8  # per background type
    background_seconds: float = 20.0
    seed: int = 0


# ---------------------------------------------------------------- building blocks


def _time(seconds: float, sample_rate: int) -> np.ndarray:
    return np.arange(int(round(seconds * sample_rate))) / sample_rate


def _fades(sound: np.ndarray, sample_rate: int, attack_s: float, release_s: float) -> np.ndarray:
    """Raised-cosine fade in/out (avoids clicks that would make every onset a broadband transient)."""
    envelope = np.ones(len(sound))
    attack = min(len(sound) // 2, max(1, int(attack_s * sample_rate)))
    release = min(len(sound) // 2, max(1, int(release_s * sample_rate)))
    envelope[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    envelope[len(sound) - release :] = 0.5 + 0.5 * np.cos(np.pi * np.arange(1, release + 1) / release)
    return sound * envelope


def _band_noise(rng: np.random.Generator, length: int, sample_rate: int, low_hz: float, high_hz: float) -> np.ndarray:
    """White noise band-passed in the frequency domain, with 20%-wide cosine skirts."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequency = np.fft.rfftfreq(length, 1.0 / sample_rate)
    skirt = 0.2
    gain = np.clip((frequency - low_hz * (1 - skirt)) / (low_hz * skirt), 0, 1)
    gain *= np.clip((high_hz * (1 + skirt) - frequency) / (high_hz * skirt), 0, 1)
    gain = 0.5 - 0.5 * np.cos(np.pi * gain)
    return np.fft.irfft(spectrum * gain, n=length)


def _coloured_noise(rng: np.random.Generator, length: int, sample_rate: int, exponent: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f**exponent above 20 Hz (1: pink, 2: brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequency = np.maximum(np.fft.rfftfreq(length, 1.0 / sample_rate), 20.0)
    return np.fft.irfft(spectrum / frequency ** (exponent / 2), n=length)


def _exponential_sweep_phase(start_hz: float, end_hz: float, t: np.ndarray, duration: float) -> np.ndarray:
    ratio = end_hz / start_hz
    return 2 * np.pi * start_hz * duration / np.log(ratio) * (ratio ** (t / duration) - 1)


# ---------------------------------------------------------------- event classes


def _tone(low_hz: float, high_hz: float) -> Generator:
    def generate(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
        t = _time(rng.uniform(0.25, 0.8), sample_rate)
        frequency = rng.uniform(low_hz, high_hz)
        tone = np.sin(2 * np.pi * frequency * t) + 0.15 * np.sin(4 * np.pi * frequency * t)
        return _fades(tone, sample_rate, 0.01, 0.02)

    return generate


def _chirp(rising: bool) -> Generator:
    def generate(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
        duration = rng.uniform(0.3, 1.2)
        t = _time(duration, sample_rate)
        low, high = rng.uniform(300, 700), rng.uniform(1800, 4000)
        start, end = (low, high) if rising else (high, low)
        return _fades(np.sin(_exponential_sweep_phase(start, end, t, duration)), sample_rate, 0.01, 0.03)

    return generate


def _siren(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    t = _time(rng.uniform(2.0, 5.0), sample_rate)
    carrier, deviation, rate = rng.uniform(600, 1000), rng.uniform(150, 400), rng.uniform(0.5, 2.0)
    # FM: instantaneous frequency carrier + deviation * sin(2 pi rate t)
    phase = 2 * np.pi * carrier * t - deviation / rate * np.cos(2 * np.pi * rate * t)
    sound = np.sin(phase) + 0.3 * np.sin(2 * phase) + 0.1 * np.sin(3 * phase)
    return _fades(sound, sample_rate, 0.05, 0.1)


def _clicks(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    length = int(rng.uniform(0.5, 2.5) * sample_rate)
    rate = rng.uniform(12, 30)
    click_length = int(0.012 * sample_rate)
    decay_samples = rng.uniform(1.5, 3.0) * 1e-3 * sample_rate
    click = rng.standard_normal(click_length) * np.exp(-np.arange(click_length) / decay_samples)
    click = np.diff(click, prepend=0.0)  # tilt towards high frequencies: a sharp tick
    sound = np.zeros(length + click_length)
    for onset in np.arange(0, length, sample_rate / rate).astype(int):
        sound[onset : onset + click_length] += click * rng.uniform(0.7, 1.0)
    return sound


def _noise_burst(low_hz: float, high_hz: float, seconds: tuple[float, float]) -> Generator:
    def generate(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
        length = int(rng.uniform(*seconds) * sample_rate)
        centre = rng.uniform(0.8, 1.2)
        burst = _band_noise(rng, length, sample_rate, low_hz * centre, high_hz * centre)
        decay = np.exp(-np.arange(length) / (length * rng.uniform(0.4, 0.9)))
        return _fades(burst * decay, sample_rate, 0.015, 0.05)

    return generate


def _plucked_string(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """Karplus-Strong: a noise burst circulating in a delay line with an averaging low-pass."""
    length = int(rng.uniform(0.8, 2.0) * sample_rate)
    period = int(sample_rate / rng.uniform(110, 440))
    decay = rng.uniform(0.990, 0.997)
    out = np.zeros(length + period + 1)
    out[: period + 1] = rng.uniform(-1, 1, period + 1)
    # y[n] = decay/2 (y[n-P] + y[n-P-1]): every block of P samples depends only on the previous ones
    for start in range(period + 1, len(out), period):
        stop = min(start + period, len(out))
        indices = np.arange(start, stop)
        out[start:stop] = 0.5 * decay * (out[indices - period] + out[indices - period - 1])
    return _fades(out[:length], sample_rate, 0.002, 0.05)


def _engine(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    t = _time(rng.uniform(3.0, 6.0), sample_rate)
    base = rng.uniform(35, 80)
    drift = 1 + 0.03 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(base * drift) / sample_rate
    sound = sum(np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 13))
    modulation = 1 + 0.35 * np.sin(2 * np.pi * rng.uniform(4, 12) * t)
    rumble = 0.3 * _band_noise(rng, len(t), sample_rate, 60, 600)
    return _fades(sound * modulation + rumble, sample_rate, 0.2, 0.3)


def _knocks(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    count = int(rng.integers(2, 5))
    interval = rng.uniform(0.15, 0.35)
    knock_length = int(0.12 * sample_rate)
    t = np.arange(knock_length) / sample_rate
    modes = rng.uniform(150, 600, size=3)
    knock = sum(np.sin(2 * np.pi * f * t) * np.exp(-t / rng.uniform(0.015, 0.035)) for f in modes)
    knock += 0.5 * rng.standard_normal(knock_length) * np.exp(-t / 0.003)
    sound = np.zeros(int(interval * (count - 1) * sample_rate) + knock_length)
    for number in range(count):
        onset = int(number * interval * sample_rate)
        sound[onset : onset + knock_length] += knock * rng.uniform(0.7, 1.0)
    return sound


def _bell(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """Risset's inharmonic bell partials, the higher ones decaying faster."""
    t = _time(rng.uniform(1.5, 3.0), sample_rate)
    base = rng.uniform(300, 900)
    ratios = (0.56, 0.92, 1.19, 1.71, 2.0, 2.74, 3.0, 3.76, 4.07)
    amplitudes = (1.0, 0.67, 1.0, 1.8, 2.67, 1.67, 1.46, 1.33, 1.33)
    length = t[-1]
    sound = sum(
        a * np.sin(2 * np.pi * r * base * t) * np.exp(-t * 4.0 * r / length)
        for r, a in zip(ratios, amplitudes)
    )
    return _fades(sound, sample_rate, 0.002, 0.05)


_VOWEL_FORMANTS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))


def _babble(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """One or two 'talkers': glottal pulse trains shaped by vowel formants, syllable by syllable."""
    length = int(rng.uniform(1.5, 4.0) * sample_rate)
    sound = np.zeros(length)
    for _ in range(int(rng.integers(1, 3))):
        pitch = rng.uniform(100, 220)
        start = 0
        while start < length:
            syllable = min(int(rng.uniform(0.12, 0.25) * sample_rate), length - start)
            t = np.arange(syllable) / sample_rate
            f0 = pitch * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
            pulses = np.diff(np.floor(np.cumsum(f0) / sample_rate), prepend=0.0)  # one impulse per period
            spectrum = np.fft.rfft(pulses + 0.05 * rng.standard_normal(syllable))
            frequency = np.fft.rfftfreq(syllable, 1.0 / sample_rate)
            shape = sum(
                1.0 / (1 + ((frequency - f) / (60 + 0.05 * f)) ** 2) / (n + 1)
                for n, f in enumerate(_VOWEL_FORMANTS[int(rng.integers(len(_VOWEL_FORMANTS)))])
            )
            voiced = np.fft.irfft(spectrum * shape, n=syllable)
            sound[start : start + syllable] += _fades(voiced, sample_rate, 0.02, 0.03) * rng.uniform(0.5, 1.0)
            start += syllable
    return _fades(sound, sample_rate, 0.02, 0.05)


def _whistle(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    duration = rng.uniform(0.5, 1.5)
    t = _time(duration, sample_rate)
    start, end = rng.uniform(1000, 2500), rng.uniform(1000, 2500)
    vibrato = 1 + rng.uniform(0.02, 0.04) * np.sin(2 * np.pi * rng.uniform(5, 7) * t)
    frequency = np.linspace(start, end, len(t)) * vibrato
    tone = np.sin(2 * np.pi * np.cumsum(frequency) / sample_rate)
    breath = 0.05 * _band_noise(rng, len(t), sample_rate, 1000, 4000)
    return _fades(tone + breath, sample_rate, 0.04, 0.06)


def _buzzer(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    t = _time(rng.uniform(0.5, 2.0), sample_rate)
    frequency = rng.uniform(90, 180)
    saw = 2 * ((frequency * t) % 1.0) - 1
    return _fades(np.sign(saw) * 0.5 + saw * 0.5, sample_rate, 0.005, 0.01)


def _drum(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    t = _time(rng.uniform(0.35, 0.6), sample_rate)
    start, end = rng.uniform(120, 180), rng.uniform(40, 55)
    frequency = end + (start - end) * np.exp(-t / 0.04)
    body = np.sin(2 * np.pi * np.cumsum(frequency) / sample_rate) * np.exp(-t / rng.uniform(0.08, 0.15))
    return _fades(body, sample_rate, 0.001, 0.03)


def _bird(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    pieces = []
    for number in range(int(rng.integers(2, 6))):
        duration = rng.uniform(0.04, 0.08)
        t = _time(duration, sample_rate)
        sweep = np.sin(_exponential_sweep_phase(rng.uniform(2500, 3200), rng.uniform(4200, 5500), t, duration))
        pieces.append(_fades(sweep, sample_rate, 0.005, 0.01))
        pieces.append(np.zeros(int(rng.uniform(0.04, 0.1) * sample_rate)))
    return np.concatenate(pieces[:-1])


EVENT_CLASSES: tuple[SoundClass, ...] = (
    SoundClass("low beep", ("low-pitched beep", "low tone"), _tone(250, 450)),
    SoundClass("beep", ("beeping", "electronic beep"), _tone(800, 1300)),
    SoundClass("high beep", ("high-pitched beep", "shrill tone"), _tone(2500, 4000)),
    SoundClass("rising chirp", ("upward sweep", "rising tone"), _chirp(rising=True)),
    SoundClass("falling chirp", ("downward sweep", "falling tone"), _chirp(rising=False)),
    SoundClass("siren", ("wailing siren", "warbling alarm"), _siren),
    SoundClass("clicking", ("click train", "ticking"), _clicks),
    SoundClass("rumble burst", ("low noise burst", "rumbling thud"), _noise_burst(80, 400, (0.3, 1.5))),
    SoundClass("hiss", ("hissing", "high noise burst"), _noise_burst(4000, 7000, (0.4, 2.0))),
    SoundClass("plucked string", ("string pluck", "guitar pluck"), _plucked_string),
    SoundClass("engine hum", ("motor running", "engine idling"), _engine),
    SoundClass("knocking", ("knock", "door knock"), _knocks),
    SoundClass("bell", ("bell ringing", "chime"), _bell),
    SoundClass("babble", ("speech babble", "murmuring voices"), _babble),
    SoundClass("whistle", ("whistling",), _whistle),
    SoundClass("buzzer", ("buzzing", "harsh buzz"), _buzzer),
    SoundClass("drum hit", ("kick drum", "thump"), _drum),
    SoundClass("bird chirp", ("chirping", "tweeting"), _bird),
)


# ---------------------------------------------------------------- backgrounds


def _hum(rng: np.random.Generator, length: int, sample_rate: int) -> np.ndarray:
    t = np.arange(length) / sample_rate
    mains = 50.0 if rng.random() < 0.5 else 60.0
    hum = sum(np.sin(2 * np.pi * h * mains * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 8))
    wander = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * t)
    hiss = _coloured_noise(rng, length, sample_rate, 1.0)
    return hum * wander + 0.05 * hiss / np.std(hiss)


def _crackle(rng: np.random.Generator, length: int, sample_rate: int) -> np.ndarray:
    crackle = np.zeros(length)
    count = rng.poisson(rng.uniform(20, 80) * length / sample_rate)
    positions = rng.integers(0, length, size=count)
    crackle[positions] = rng.standard_normal(count) * rng.pareto(3.0, size=count)
    kernel = np.exp(-np.arange(int(0.002 * sample_rate)) / (0.0005 * sample_rate))
    crackle = np.convolve(crackle, kernel)[:length]
    floor = _coloured_noise(rng, length, sample_rate, 1.0)
    return crackle / (np.std(crackle) + 1e-12) + 0.3 * floor / (np.std(floor) + 1e-12)


BACKGROUND_TYPES: tuple[tuple[str, tuple[str, ...], Callable[[np.random.Generator, int, int], np.ndarray]], ...] = (
    ("pink noise", ("steady noise", "static"), lambda rng, n, sr: _coloured_noise(rng, n, sr, 1.0)),
    ("brown noise", ("low rumble", "rumbling noise"), lambda rng, n, sr: _coloured_noise(rng, n, sr, 2.0)),
    ("electrical hum", ("mains hum", "humming"), _hum),
    ("crackling", ("crackle", "vinyl crackle"), _crackle),
)


# ---------------------------------------------------------------- writing


def slug(name: str) -> str:
    return name.replace(" ", "_")


def variation_split(variation: int, variations: int) -> str:
    held_out = max(1, variations // EVAL_SHARE)
    return "eval" if variation >= variations - held_out else "train"


def _rng(settings: BankSettings, name: str, variation: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, zlib.crc32(name.encode()), variation])


def event_clip(sound: SoundClass, variation: int, settings: BankSettings) -> np.ndarray:
    """[S] float64: the sound at a drawn peak level, silence of 50-300 ms around it, a faint noise floor."""
    rng = _rng(settings, sound.name, variation)
    core = sound.generate(rng, settings.sample_rate)
    core = core * rng.uniform(0.3, 0.9) / np.max(np.abs(core))
    lead, tail = (int(rng.uniform(0.05, 0.3) * settings.sample_rate) for _ in range(2))
    clip = np.concatenate([np.zeros(lead), core, np.zeros(tail)])
    floor = np.max(np.abs(core)) * 10 ** (NOISE_FLOOR_DB / 20)
    return clip + floor * rng.uniform(-1, 1, len(clip))


def background_clip(kind: int, variation: int, settings: BankSettings) -> np.ndarray:
    """[S] float64 background of `settings.background_seconds`, RMS 0.05."""
    name, _, generate = BACKGROUND_TYPES[kind]
    rng = _rng(settings, name, variation)
    length = int(round(settings.background_seconds * settings.sample_rate))
    sound = generate(rng, length, settings.sample_rate)
    sound = sound - sound.mean()
    sound = sound * 0.05 / np.sqrt(np.mean(sound**2))
    return np.clip(sound, -0.99, 0.99)


def _write_lines(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_builtin_bank(folder: str | Path, settings: BankSettings = BankSettings()) -> Path:
    """Write the bank into `folder` (kept as is when a complete bank of the same settings is there)."""
    if settings.variations < 2 or settings.background_variations < 2:
        raise ValueError("the bank needs at least 2 variations per class and background type (train and eval)")
    folder = Path(folder)
    manifest_path = folder / "bank.json"
    manifest = {**asdict(settings), "classes": [sound.name for sound in EVENT_CLASSES]}
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return folder
    events: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for sound in EVENT_CLASSES:
        for variation in range(settings.variations):
            relative = f"events/{slug(sound.name)}/{slug(sound.name)}_{variation:02d}.wav"
            write_wav_atomic(folder / relative, event_clip(sound, variation, settings), settings.sample_rate, "PCM_16")
            row = {"path": relative, "label": sound.name}
            events[variation_split(variation, settings.variations)].append(row)
            events["all"].append(row)
    backgrounds: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for kind, (name, _, _) in enumerate(BACKGROUND_TYPES):
        for variation in range(settings.background_variations):
            relative = f"backgrounds/{slug(name)}_{variation:02d}.wav"
            clip = background_clip(kind, variation, settings)
            write_wav_atomic(folder / relative, clip, settings.sample_rate, "PCM_16")
            row = {"path": relative, "label": name}
            backgrounds[variation_split(variation, settings.background_variations)].append(row)
            backgrounds["all"].append(row)
    for split in SPLITS:
        _write_lines(folder / f"events_{split}.jsonl", events[split])
        _write_lines(folder / f"backgrounds_{split}.jsonl", backgrounds[split])
    bank_rows = [{"phrase": s.name, "alternatives": list(s.alternatives)} for s in EVENT_CLASSES]
    bank_rows += [{"phrase": name, "alternatives": list(alternatives)} for name, alternatives, _ in BACKGROUND_TYPES]
    _write_lines(folder / "phrase_bank.jsonl", bank_rows)
    write_text_atomic(manifest_path, json.dumps(manifest) + "\n")
    return folder


def bank_paths(folder: str | Path, split: str) -> tuple[Path, Path, Path]:
    """(events index, backgrounds index, phrase bank) of a written bank for `split` (train | eval | all)."""
    if split not in SPLITS:
        raise ValueError(f"unknown bank split {split!r} (choose from {', '.join(SPLITS)})")
    folder = Path(folder)
    return folder / f"events_{split}.jsonl", folder / f"backgrounds_{split}.jsonl", folder / "phrase_bank.jsonl"
