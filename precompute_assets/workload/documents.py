"""Synthetic multilingual documents for the embedding pipeline: many scripts, realistic lengths, topics.

Each document has one language and one of ``N_TOPICS`` topics. A topic gives every language its own small
set of pseudo-words built from that language's syllables, and a document draws part of its words from its
topic's set, so documents of one topic and language share vocabulary and are each other's neighbours.

Document ``i`` depends only on ``(seed, i)``: generating ids 0..999 in one call or in two calls (with
``start_id``), or with any chunk size, gives the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd

N_TOPICS = 50
TOPIC_WORDS = 16  # pseudo-words per (language, topic)
BLOCK = 10_000  # documents generated per RNG stream; fixes doc i regardless of chunking
TITLE_WORDS = (3, 12)
BODY_MEDIAN_WORDS = 150
BODY_SIGMA = 0.6  # lognormal spread: about 1 body in 1000 is over 1000 words
BODY_WORDS = (10, 4000)
P_TOPIC_TITLE = 0.5
P_TOPIC_BODY = 0.3
P_SENTENCE_END = 1 / 12
VOCAB_SEED = 20_240_601  # the topic vocabulary is part of the "world", not of one generated sample

# code: (common words, syllables for topic pseudo-words, word separator, sentence end)
LANGUAGES: dict[str, tuple[str, str, str, str]] = {
    "en": (
        "the of and to in is that for it with as was on are be this by from at or have not but they which"
        " one all were we can there their more when will new people time year work first also after city"
        " world report",
        "ar ber con den el for gen han ing ly mar ner or per qua ron ster tion un ver wer ble cast dor ment",
        " ",
        ".",
    ),
    "de": (
        "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden"
        " aus er hat dass sie nach wird bei einer um am sind noch wie über jahr neue stadt welt menschen zeit"
        " größe",
        "ber sch ung keit lich ver ge stadt wer mann hof burg ein zeit kraft wald heit stein",
        " ",
        ".",
    ),
    "fr": (
        "le la les de des et à un une en du est que pour dans qui sur pas par plus au avec ce il elle sont"
        " ont été aussi nouveau année ville monde temps gens après être très français",
        "eau ment cour ville té ais on pré lieu reau gne oir elle ande mont fleur cha",
        " ",
        ".",
    ),
    "es": (
        "el la los las de del y en que un una es por con para se no su al lo como más pero sus le ya o fue"
        " este ha sí año ciudad mundo tiempo gente después también nuevo españa",
        "ción mente ado ero ista cas lla dor ria mon sol tierra ano ez gue pla",
        " ",
        ".",
    ),
    "pt": (
        "o a os as de do da dos das e em no na um uma que para com não por mais se como foi ao ser são"
        " também ano cidade mundo tempo pessoas depois novo ainda já entre muito coração",
        "ção mento inho ões eira lha dor ão ista mar terra são nho ver bra",
        " ",
        ".",
    ),
    "tr": (
        "ve bir bu da de için ile çok daha olarak gibi en ama sonra kadar her olan yeni yıl şehir dünya"
        " zaman insanlar büyük ilk ise değil var yok oldu göre içinde önce şimdi türkiye güzel çalışma",
        "lar ler cık lık giz daş şen kara yol gül tepe su ağa öz çay göl",
        " ",
        ".",
    ),
    "ru": (
        "и в не на я что он с это а как по но они к из у за то от о так же все для год время город мир"
        " люди после новый также был была было может только россия работа",
        "ов ск ник ость ств ра пол гор ми ка лен вод зем ель ин ко",
        " ",
        ".",
    ),
    "ar": (
        "في من على إلى أن عن مع هذا هذه كان التي الذي ما لا هو هي كل بعد قبل بين عام مدينة العالم الوقت"
        " الناس جديد أيضا حيث ذلك عند منذ حتى لم قد العمل الدولة الحكومة الأول",
        "ال مد كت ري سل عم نا حر قو بي جم ور فت شر لم ية",
        " ",
        ".",
    ),
    "hi": (
        "के है में की और को से का एक पर यह था कि भी लिए हैं ने तो जो कर नहीं हो गया साथ बाद साल शहर"
        " दुनिया समय लोग नया भारत सरकार काम पहले अब कुछ बहुत दिन",
        "प्र का वि सं रा मा ना ली ति क्ष द्य धा स्थ नी भा गु",
        " ",
        "।",
    ),
    "zh": (
        "的 是 在 了 和 有 我们 这个 中国 发展 经济 社会 人民 国家 时间 城市 世界 工作 问题 今年 新 大 上 不"
        " 也 就 都 对 说 会 可以 已经 表示 进行 公司 市场 政府 技术 文化 生活",
        "电 子 学 生 医 院 科 技 体 育 金 融 交 通 能 源 环 境 教 农 业 旅 游 音 乐 军 事 法 律",
        "",
        "。",
    ),
    "ja": (
        "の に は を た が で て と し れ さ ある いる も する から な こと として い や れる など なっ ない"
        " この ため その あっ よう また もの という 日本 東京 時間 世界 会社 社会 今年 問題",
        "テ レ ビ ス ポ ツ カ メ ラ 音 楽 電 車 料 理 医 療 教 育 宇 宙 株 式 天 気",
        "",
        "。",
    ),
    "ko": (
        "이 그 저 것 수 등 및 있다 하다 되다 없다 않다 대한 위해 통해 그리고 하지만 또한 올해 도시 세계 시간"
        " 사람들 새로운 한국 정부 회사 문제 경제 사회 문화 기술 시장 이번 가장 지난 함께 많은",
        "전 자 학 생 병 원 과 기 술 체 육 금 융 교 통 에 너 지 환 경 음 악 여 행",
        " ",
        ".",
    ),
    "el": (
        "και το η ο της του να σε με τα για την τον που από οι είναι στο στην ένα μια δεν θα των τις χρόνο"
        " πόλη κόσμο χρόνος άνθρωποι μετά επίσης νέο ελλάδα κυβέρνηση εργασία πρώτη σήμερα αθήνα",
        "ισ ικ ος πολ θεσ νη αρ μα τικ λογ ση κρα φω γη δρο",
        " ",
        ".",
    ),
    "th": (
        "ที่ และ ใน ของ การ เป็น มี ได้ ไม่ จะ ให้ ว่า กับ แล้ว นี้ คน ไป มา ก็ เมื่อ ปี เมือง โลก เวลา ประเทศ"
        " ไทย รัฐบาล งาน ใหม่ วันนี้ ข่าว บริษัท ตลาด เศรษฐกิจ สังคม วัฒนธรรม เทคโนโลยี กรุงเทพ",
        "กา รม นา ศึก ษา โร ไฟ ฟ้า กี ฬา ดน ตรี อา หาร ท่อง เที่ยว",
        "",
        " ",  # Thai separates sentences, not words, with a space
    ),
}

# Relative frequency of each language in a generated corpus; English is the most common, as in most corpora.
LANGUAGE_WEIGHTS: dict[str, float] = {code: (4.0 if code == "en" else 1.0) for code in LANGUAGES}


@dataclass(frozen=True)
class _Vocabulary:
    """Every token of every language as UTF-8 bytes (separator included), in one flat buffer."""

    buffer: np.ndarray  # uint8
    offsets: np.ndarray  # int32 start of token t in buffer
    lengths: np.ndarray  # int32 byte length of token t
    n_plain: int  # tokens >= n_plain are the sentence-ending variants of token - n_plain
    common_start: np.ndarray  # (languages,) first common-word token of each language
    common_count: np.ndarray  # (languages,)
    topic_start: np.ndarray  # (languages, topics) first pseudo-word token of that topic


def topic_words(language: str, topic: int) -> list[str]:
    """The pseudo-words of one topic in one language (fixed: independent of any generation seed)."""
    syllables = LANGUAGES[language][1].split()
    lang_index = list(LANGUAGES).index(language)
    rng = np.random.default_rng([VOCAB_SEED, lang_index, topic])
    words: list[str] = []
    while len(words) < TOPIC_WORDS:
        parts = rng.choice(len(syllables), size=int(rng.integers(2, 4)))
        word = "".join(syllables[p] for p in parts)
        if word not in words:
            words.append(word)
    return words


@cache
def _vocabulary() -> _Vocabulary:
    plain: list[str] = []
    ends: list[str] = []
    n_lang = len(LANGUAGES)
    common_start = np.zeros(n_lang, dtype=np.int64)
    common_count = np.zeros(n_lang, dtype=np.int64)
    topic_start = np.zeros((n_lang, N_TOPICS), dtype=np.int64)

    def add(words: list[str], sep: str, end: str) -> None:
        plain.extend(w + sep for w in words)
        # a sentence end is followed by a space unless the script's terminator is itself the separator
        ends.extend(w + end + ("" if end.isspace() or not sep else " ") for w in words)

    for i, (common, _syllables, sep, end) in enumerate(LANGUAGES.values()):
        words = common.split()
        common_start[i], common_count[i] = len(plain), len(words)
        add(words, sep, end)
        for topic in range(N_TOPICS):
            topic_start[i, topic] = len(plain)
            add(topic_words(list(LANGUAGES)[i], topic), sep, end)
    encoded = [t.encode() for t in plain + ends]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    return _Vocabulary(
        buffer=np.frombuffer(b"".join(encoded), dtype=np.uint8),
        offsets=(np.cumsum(lengths) - lengths).astype(np.int32),
        lengths=lengths.astype(np.int32),
        n_plain=len(plain),
        common_start=common_start,
        common_count=common_count,
        topic_start=topic_start,
    )


def _gather_bytes(vocab: _Vocabulary, tokens: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The concatenated bytes of ``tokens`` and the byte offset where each token starts (plus the end)."""
    # int32 throughout: a block is far below 2 GiB, and half-width arrays halve the page faults
    lengths = vocab.lengths[tokens]
    bounds = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    # byte k of the output comes from byte (k - start of its token) of that token in the vocabulary
    shift = (vocab.offsets[tokens] - bounds[:-1]).astype(np.int32)
    source = np.repeat(shift, lengths)
    source += np.arange(len(source), dtype=np.int32)
    return vocab.buffer[source].tobytes(), bounds


def _block(seed: int, block: int) -> pd.DataFrame:
    """Documents ``block * BLOCK`` .. ``(block + 1) * BLOCK - 1``, from their own RNG stream."""
    vocab = _vocabulary()
    rng = np.random.default_rng([seed, block])
    n = BLOCK
    codes = list(LANGUAGES)
    weights = np.array([LANGUAGE_WEIGHTS[c] for c in codes])
    lang = rng.choice(len(codes), size=n, p=weights / weights.sum())
    topic = rng.integers(0, N_TOPICS, size=n)
    title_len = rng.integers(TITLE_WORDS[0], TITLE_WORDS[1] + 1, size=n)
    body_len = np.clip(np.rint(rng.lognormal(np.log(BODY_MEDIAN_WORDS), BODY_SIGMA, size=n)), *BODY_WORDS).astype(
        np.int64
    )

    doc_len = title_len + body_len
    doc_start = np.cumsum(doc_len) - doc_len
    doc_of = np.repeat(np.arange(n), doc_len)
    pos = np.arange(doc_of.size) - doc_start[doc_of]
    in_title = pos < title_len[doc_of]
    tok_lang, tok_topic = lang[doc_of], topic[doc_of]

    from_topic = rng.random(doc_of.size) < np.where(in_title, P_TOPIC_TITLE, P_TOPIC_BODY)
    pick = rng.random(doc_of.size)
    common = vocab.common_start[tok_lang] + (pick * vocab.common_count[tok_lang]).astype(np.int64)
    topical = vocab.topic_start[tok_lang, tok_topic] + (pick * TOPIC_WORDS).astype(np.int64)
    tokens = np.where(from_topic, topical, common)
    last_of_doc = pos == doc_len[doc_of] - 1
    sentence_end = ~in_title & ((rng.random(doc_of.size) < P_SENTENCE_END) | last_of_doc)
    tokens = tokens + sentence_end * vocab.n_plain

    buffer, starts = _gather_bytes(vocab, tokens)
    title_at, body_at, end_at = starts[doc_start], starts[doc_start + title_len], starts[doc_start + doc_len]
    titles = [buffer[a:b].decode().strip() for a, b in zip(title_at.tolist(), body_at.tolist(), strict=True)]
    bodies = [buffer[a:b].decode().strip() for a, b in zip(body_at.tolist(), end_at.tolist(), strict=True)]
    return pd.DataFrame(
        {
            "title": titles,
            "body": bodies,
            "language": np.array(codes, dtype=object)[lang],
            "topic": topic.astype(np.int16),
        }
    )


def generate_documents(
    n: int, *, seed: int = 0, start_id: int = 0, chunk_size: int = 100_000
) -> Iterator[pd.DataFrame]:
    """Yield documents ``start_id .. start_id + n - 1`` in DataFrames of at most ``chunk_size`` rows.

    Columns: ``doc_id`` (``doc00000042``), ``title``, ``body``, ``language`` (ISO 639-1), ``topic`` (int).
    """
    if n < 0 or start_id < 0 or chunk_size <= 0:
        raise ValueError("n and start_id must be >= 0 and chunk_size > 0")
    pending: list[pd.DataFrame] = []
    pending_rows = 0
    next_id, stop = start_id, start_id + n
    while next_id < stop:
        block = next_id // BLOCK
        lo, hi = next_id - block * BLOCK, min(stop - block * BLOCK, BLOCK)
        part = _block(seed, block).iloc[lo:hi]
        part.insert(0, "doc_id", [f"doc{i:08d}" for i in range(next_id, next_id + len(part))])
        pending.append(part)
        pending_rows += len(part)
        next_id += len(part)
        if pending_rows < chunk_size and next_id < stop:
            continue
        frame = pd.concat(pending, ignore_index=True)
        full = len(frame) if next_id >= stop else len(frame) - len(frame) % chunk_size
        for at in range(0, full, chunk_size):
            yield frame.iloc[at : min(at + chunk_size, full)].reset_index(drop=True)
        pending = [frame.iloc[full:]] if full < len(frame) else []
        pending_rows = len(frame) - full
