"""The versioned inputs that define what an aligned model learns: taxonomy and prompt templates.

A taxonomy is a YAML file (domains -> categories -> subcategories, each subcategory with a
description and the rule a safe answer follows, plus `principles` and a `version`); a prompt set
is a folder of `$placeholder` templates. Both are named by path or by a built-in name
(`safevid_v1`, `v1`), and both carry a content hash so every generated record says exactly which
rules and wording produced it.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
TAXONOMY_DIR = PACKAGE_DIR / "taxonomy"
PROMPTS_DIR = PACKAGE_DIR / "prompts"
DEFAULT_TAXONOMY = "safevid_v1"
DEFAULT_PROMPTS = "v1"
PROMPT_NAMES = ("caption_system", "caption_user", "system", "categorize", "queries", "chosen",
                "rejected", "verify")
_KEY = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class Subcategory:
    path: str  # "domain/category/subcategory"
    title: str  # the domain's title
    category_description: str
    description: str
    rule: str


@dataclass(frozen=True)
class Taxonomy:
    name: str
    version: str
    source: str  # path as given, or "data_prep/taxonomy/<file>" for a built-in
    sha: str
    principles: tuple[str, ...]
    leaves: dict[str, Subcategory]

    @property
    def label(self) -> str:
        return f"{self.source}@{self.version}"

    def principles_text(self) -> str:
        return "\n".join(f"- {p}" for p in self.principles)

    def listing(self) -> str:
        """One line per subcategory, for the categorisation prompt."""
        return "\n".join(f"{leaf.path}: {leaf.description}" for leaf in self.leaves.values())


@dataclass(frozen=True)
class PromptSet:
    name: str
    source: str
    sha: str  # over all templates: the `prompt_template_sha` of generated records
    templates: dict[str, str]

    def render(self, name: str, **values: object) -> str:
        """Fill a template; a missing value is an error, not a silent blank."""
        try:
            return string.Template(self.templates[name]).substitute(
                {k: str(v) for k, v in values.items()})
        except KeyError as exc:
            raise ValueError(f"prompt {self.source}/{name}.txt needs a value for {exc}") from exc

    def sha_of(self, *names: str) -> str:
        blob = "\x00".join(f"{n}\x00{self.templates[n]}" for n in names)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _resolve(name_or_path: str, builtin_dir: Path, suffix: str) -> tuple[Path, str]:
    path = Path(name_or_path)
    if path.exists():
        return path, str(name_or_path)
    builtin = builtin_dir / f"{name_or_path}{suffix}"
    if builtin.exists():
        return builtin, f"data_prep/{builtin_dir.name}/{builtin.name}"
    choices = sorted(p.name.removesuffix(suffix) for p in builtin_dir.iterdir()
                     if not p.name.startswith((".", "_")))
    raise FileNotFoundError(f"{name_or_path}: no such file, and not a built-in "
                            f"(built-ins: {', '.join(choices)})")


def load_taxonomy(name_or_path: str = DEFAULT_TAXONOMY) -> Taxonomy:
    """Load and check a taxonomy; errors name the file and the offending key."""
    path, source = _resolve(name_or_path, TAXONOMY_DIR, ".yaml")
    raw = path.read_bytes()
    doc = yaml.safe_load(raw)
    where = str(path)
    if not isinstance(doc, dict) or "version" not in doc or "domains" not in doc:
        raise ValueError(f"{where}: a taxonomy needs `version` and `domains`")
    leaves: dict[str, Subcategory] = {}
    for dkey, domain in doc["domains"].items():
        for ckey, category in (domain or {}).get("categories", {}).items():
            for skey, sub in (category or {}).get("subcategories", {}).items():
                path_ = f"{dkey}/{ckey}/{skey}"
                if not all(_KEY.match(k) for k in (dkey, ckey, skey)):
                    raise ValueError(f"{where}: {path_}: keys must match [a-z0-9_]+")
                if not sub or not sub.get("description") or not sub.get("rule"):
                    raise ValueError(f"{where}: {path_}: needs a description and a rule")
                leaves[path_] = Subcategory(
                    path=path_,
                    title=str(domain.get("title", dkey)),
                    category_description=str(category.get("description", "")).strip(),
                    description=" ".join(str(sub["description"]).split()),
                    rule=" ".join(str(sub["rule"]).split()),
                )
    if not leaves:
        raise ValueError(f"{where}: taxonomy has no subcategories")
    return Taxonomy(
        name=str(doc.get("name", path.stem)),
        version=str(doc["version"]),
        source=source,
        sha=hashlib.sha256(raw).hexdigest()[:16],
        principles=tuple(" ".join(str(p).split()) for p in doc.get("principles", [])),
        leaves=leaves,
    )


def load_prompts(name_or_dir: str = DEFAULT_PROMPTS) -> PromptSet:
    """Load a prompt set: one `<name>.txt` per template in PROMPT_NAMES."""
    path, source = _resolve(name_or_dir, PROMPTS_DIR, "")
    templates = {}
    for name in PROMPT_NAMES:
        file = path / f"{name}.txt"
        if not file.exists():
            raise FileNotFoundError(f"{file}: missing prompt template")
        templates[name] = file.read_text(encoding="utf-8").strip()
    blob = "\x00".join(f"{n}\x00{templates[n]}" for n in PROMPT_NAMES)
    return PromptSet(name=path.name, source=source,
                     sha=hashlib.sha256(blob.encode()).hexdigest()[:16], templates=templates)


__all__ = ["PromptSet", "Subcategory", "Taxonomy", "load_prompts", "load_taxonomy"]
