"""The license of a derived model, resolved from its parents' licenses: the most restrictive wins.

Licenses are ranked by what they demand of a derivative (higher is more restrictive):

  0 public domain (cc0-1.0, unlicense)      3 strong copyleft (gpl-3.0, agpl-3.0)
  1 permissive (mit, apache-2.0, cc-by-4.0)  4 use-restricted model licenses (llama2/3.x, gemma, OpenRAIL, qwen)
  2 share-alike (cc-by-sa-4.0, lgpl, mpl)    5 non-commercial (cc-by-nc-*, research-only licenses)
                                             6 no derivatives (cc-by-nd-*, cc-by-nc-nd-*)

The output takes the most restrictive parent license (apache-2.0 + llama2 -> llama2; among permissive
licenses the one that asks the most: mit + apache-2.0 -> apache-2.0). Every parent's
notices and attributions are kept ("Built with Llama", Gemma's terms notice, Apache's NOTICE). Two
different licenses of the top rank (llama3 and gemma) both bind the output: it is published as ``other``
and the conflict is reported. A parent that declares a license mtool does not know (a custom one) makes the
output ``other``, reported. A parent that declares no license at all makes the output's license unknown: nothing
is written in its card's metadata, and the card says how to fix it (declare the parent's license, or choose one
with ``mtool card --license``). Unknown is never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PUBLIC_DOMAIN, PERMISSIVE, SHARE_ALIKE, COPYLEFT, USE_RESTRICTED, NON_COMMERCIAL, NO_DERIVATIVES = range(7)


@dataclass(frozen=True)
class LicenseTerms:
    """What one license asks of a derivative."""

    id: str  # the Hub's license id, or the license_name of an ``other`` license
    rank: int
    title: str
    link: str | None = None
    hub_other: bool = False  # not a Hub license id: published as ``license: other`` + license_name/link
    notice: str | None = None  # text to carry in the card (and a NOTICE file)
    attribution: str | None = None  # what must be displayed ("Built with Llama")
    name_prefix: str | None = None  # the derivative's name must begin with this
    conditions: tuple[str, ...] = ()


def _terms(*entries: LicenseTerms) -> dict[str, LicenseTerms]:
    return {entry.id: entry for entry in entries}


_LLAMA_CONDITIONS = ("comply with Meta's Acceptable Use Policy",
                     "include a copy of the license with any distribution",
                     "a licensee with more than 700 million monthly active users needs a license from Meta")


def _llama(release: str, *, prefix: str, attribution: str, link: str) -> LicenseTerms:
    product = "Meta Llama 3" if release == "3" else f"Llama {release}"
    return LicenseTerms(
        id=f"llama{release}", rank=USE_RESTRICTED, title=f"{product} Community License", link=link,
        notice=f"{product} is licensed under the {product} Community License, Copyright © Meta Platforms, Inc. "
               "All Rights Reserved.",
        attribution=attribution, name_prefix=prefix, conditions=_LLAMA_CONDITIONS)


KNOWN_LICENSES: dict[str, LicenseTerms] = _terms(
    *(LicenseTerms(i, PUBLIC_DOMAIN, t) for i, t in (
        ("cc0-1.0", "CC0 1.0"), ("unlicense", "The Unlicense"), ("pddl", "ODC Public Domain Dedication"),
        ("wtfpl", "WTFPL"))),
    LicenseTerms("apache-2.0", PERMISSIVE, "Apache License 2.0", "https://www.apache.org/licenses/LICENSE-2.0",
                 conditions=("keep the parents' copyright and NOTICE texts", "state the changes made")),
    LicenseTerms("mit", PERMISSIVE, "MIT License", "https://opensource.org/license/mit",
                 conditions=("keep the parents' copyright notice and permission notice",)),
    *(LicenseTerms(i, PERMISSIVE, t, conditions=("keep the parents' copyright notices",)) for i, t in (
        ("bsd", "BSD"), ("bsd-2-clause", "BSD 2-Clause"), ("bsd-3-clause", "BSD 3-Clause"),
        ("bsd-3-clause-clear", "BSD 3-Clause Clear"), ("isc", "ISC"), ("zlib", "zlib"), ("bsl-1.0", "Boost 1.0"),
        ("afl-3.0", "Academic Free License 3.0"), ("ecl-2.0", "ECL 2.0"), ("postgresql", "PostgreSQL"),
        ("ncsa", "NCSA"), ("ms-pl", "Ms-PL"), ("cdla-permissive-1.0", "CDLA Permissive 1.0"),
        ("cdla-permissive-2.0", "CDLA Permissive 2.0"), ("odc-by", "ODC Attribution"),
        ("openmdw-1.0", "OpenMDW 1.0"), ("artistic-2.0", "Artistic 2.0"))),
    *(LicenseTerms(i, PERMISSIVE, t, conditions=("credit the parents' authors and link the license",))
      for i, t in (("cc-by-2.0", "CC BY 2.0"), ("cc-by-2.5", "CC BY 2.5"), ("cc-by-3.0", "CC BY 3.0"),
                   ("cc-by-4.0", "CC BY 4.0"))),
    *(LicenseTerms(i, SHARE_ALIKE, t, conditions=("distribute the derivative under the same license",
                                                  "credit the parents' authors"))
      for i, t in (("cc-by-sa-3.0", "CC BY-SA 3.0"), ("cc-by-sa-4.0", "CC BY-SA 4.0"),
                   ("cdla-sharing-1.0", "CDLA Sharing 1.0"), ("odbl", "ODbL"), ("gfdl", "GFDL"))),
    *(LicenseTerms(i, SHARE_ALIKE, t, conditions=("keep the licensed parts under the same license",))
      for i, t in (("lgpl", "LGPL"), ("lgpl-2.1", "LGPL 2.1"), ("lgpl-3.0", "LGPL 3.0"), ("lgpl-lr", "LGPL-LR"),
                   ("mpl-2.0", "MPL 2.0"), ("epl-1.0", "EPL 1.0"), ("epl-2.0", "EPL 2.0"), ("eupl-1.1", "EUPL 1.1"),
                   ("eupl-1.2", "EUPL 1.2"), ("osl-3.0", "OSL 3.0"))),
    *(LicenseTerms(i, COPYLEFT, t, conditions=("distribute the derivative under the same license with its source",))
      for i, t in (("gpl", "GPL"), ("gpl-2.0", "GPL 2.0"), ("gpl-3.0", "GPL 3.0"), ("agpl-3.0", "AGPL 3.0"))),
    *(LicenseTerms(i, USE_RESTRICTED, t, conditions=("pass the use restrictions on to every user",))
      for i, t in (("openrail", "OpenRAIL"), ("openrail++", "OpenRAIL++"),
                   ("bigscience-openrail-m", "BigScience OpenRAIL-M"),
                   ("creativeml-openrail-m", "CreativeML OpenRAIL-M"), ("bigcode-openrail-m", "BigCode OpenRAIL-M"),
                   ("bigscience-bloom-rail-1.0", "BigScience BLOOM RAIL 1.0"))),
    LicenseTerms("llama2", USE_RESTRICTED, "Llama 2 Community License",
                 "https://ai.meta.com/llama/license/",
                 notice="Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta Platforms, "
                        "Inc. All Rights Reserved.", conditions=_LLAMA_CONDITIONS),
    _llama("3", prefix="Llama-3", attribution="Built with Meta Llama 3",
           link="https://llama.meta.com/llama3/license/"),
    _llama("3.1", prefix="Llama", attribution="Built with Llama",
           link="https://github.com/meta-llama/llama-models/blob/main/models/llama3_1/LICENSE"),
    _llama("3.2", prefix="Llama", attribution="Built with Llama",
           link="https://github.com/meta-llama/llama-models/blob/main/models/llama3_2/LICENSE"),
    _llama("3.3", prefix="Llama", attribution="Built with Llama",
           link="https://github.com/meta-llama/llama-models/blob/main/models/llama3_3/LICENSE"),
    _llama("4", prefix="Llama", attribution="Built with Llama",
           link="https://github.com/meta-llama/llama-models/blob/main/models/llama4/LICENSE"),
    LicenseTerms("gemma", USE_RESTRICTED, "Gemma Terms of Use", "https://ai.google.dev/gemma/terms",
                 notice="Gemma is provided under and subject to the Gemma Terms of Use found at "
                        "ai.google.dev/gemma/terms",
                 conditions=("pass the Gemma Prohibited Use Policy on to every user",)),
    LicenseTerms("qwen", USE_RESTRICTED, "Qwen License Agreement",
                 "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE", hub_other=True,
                 notice="Qwen is licensed under the Qwen LICENSE AGREEMENT, Copyright (c) Alibaba Cloud. "
                        "All Rights Reserved.", attribution="Built with Qwen",
                 conditions=("a licensee with more than 100 million monthly active users needs a license "
                             "from Alibaba Cloud",)),
    LicenseTerms("deepseek", USE_RESTRICTED, "DeepSeek License Agreement",
                 "https://github.com/deepseek-ai/DeepSeek-LLM/blob/main/LICENSE-MODEL", hub_other=True,
                 conditions=("pass the use restrictions on to every user",)),
    *(LicenseTerms(i, NON_COMMERCIAL, t, conditions=("non-commercial use only", "credit the parents' authors"))
      for i, t in (("cc-by-nc-2.0", "CC BY-NC 2.0"), ("cc-by-nc-3.0", "CC BY-NC 3.0"),
                   ("cc-by-nc-4.0", "CC BY-NC 4.0"), ("cc-by-nc-sa-2.0", "CC BY-NC-SA 2.0"),
                   ("cc-by-nc-sa-3.0", "CC BY-NC-SA 3.0"), ("cc-by-nc-sa-4.0", "CC BY-NC-SA 4.0"))),
    *(LicenseTerms(i, NON_COMMERCIAL, t, conditions=("non-commercial research use only",))
      for i, t in (("fair-noncommercial-research-license", "FAIR Noncommercial Research License"),
                   ("apple-amlr", "Apple Machine Learning Research Model License"),
                   ("h-research", "H Research License"), ("intel-research", "Intel Research License"),
                   ("deepfloyd-if-license", "DeepFloyd IF License"), ("apple-ascl", "Apple Sample Code License"))),
    LicenseTerms("qwen-research", NON_COMMERCIAL, "Qwen Research License Agreement",
                 "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE", hub_other=True,
                 attribution="Built with Qwen", conditions=("non-commercial research use only",)),
    *(LicenseTerms(i, NO_DERIVATIVES, t, conditions=("no derivatives may be distributed",))
      for i, t in (("cc-by-nd-4.0", "CC BY-ND 4.0"), ("cc-by-nc-nd-3.0", "CC BY-NC-ND 3.0"),
                   ("cc-by-nc-nd-4.0", "CC BY-NC-ND 4.0"))),
)

_ALIASES = {
    "apache2": "apache-2.0", "apache-2": "apache-2.0", "apache2.0": "apache-2.0", "apachelicense2.0": "apache-2.0",
    "apachelicenseversion2.0": "apache-2.0", "mitlicense": "mit", "llama-2": "llama2", "llama-3": "llama3",
    "llama-3.1": "llama3.1", "llama-3.2": "llama3.2", "llama-3.3": "llama3.3", "llama-4": "llama4",
    "gemma-terms-of-use": "gemma", "tongyi-qianwen": "qwen", "qwen-license": "qwen", "deepseek-license": "deepseek",
    "gpl3": "gpl-3.0", "agpl3": "agpl-3.0", "cc-by-nc": "cc-by-nc-4.0", "cc-by-sa": "cc-by-sa-4.0",
}


# Permissive licenses combine: the output takes the one that asks the most (Apache's NOTICE and patent terms,
# then CC BY's attribution), and keeps every parent's conditions.
_PERMISSIVE_PREFERENCE = ("apache-2.0", "cc-by-4.0", "cc-by-3.0", "cc-by-2.5", "cc-by-2.0")


def normalize_license(text: str | None) -> str | None:
    """The id a declared license stands for (``"Apache 2.0"`` -> ``apache-2.0``); the lower-cased text when
    it is not a known license; None for an empty declaration."""
    if not text or not str(text).strip():
        return None
    key = str(text).strip().lower()
    if key in KNOWN_LICENSES:
        return key
    compact = re.sub(r"[\s_]+", "-", key)
    for candidate in (compact, compact.replace("-", ""), re.sub(r"[\s_-]+", "", key)):
        if candidate in KNOWN_LICENSES:
            return candidate
        if candidate in _ALIASES:
            return _ALIASES[candidate]
    return compact


@dataclass(frozen=True)
class ParentLicense:
    """A parent's declared license, as the card found it."""

    parent: str  # the parent's id, for messages
    license: str | None  # the declared id ("other" allowed)
    license_name: str | None = None
    license_link: str | None = None
    inferred: bool = False  # read from the publisher's known license, not declared by the parent


@dataclass
class LicenseResolution:
    """The output's license, and what the parents' licenses ask of it."""

    license: str | None  # a Hub license id, "other", or None when a parent declares no license (unknown)
    license_name: str | None = None
    license_link: str | None = None
    governing: list[LicenseTerms] = field(default_factory=list)  # the license(s) that decided
    notices: list[str] = field(default_factory=list)
    attributions: list[str] = field(default_factory=list)
    conditions: list[str] = field(default_factory=list)
    name_prefix: str | None = None
    non_commercial: bool = False
    derivatives_forbidden: bool = False
    reports: list[str] = field(default_factory=list)  # conflicts and unknowns a person must look at
    undeclared: list[str] = field(default_factory=list)  # the parents that declare no license
    overridden: bool = False  # chosen with --license rather than resolved from the parents

    @property
    def front_matter(self) -> dict[str, str]:
        if self.license is None:
            return {}
        data = {"license": self.license}
        if self.license == "other":
            data.update({k: v for k, v in (("license_name", self.license_name),
                                            ("license_link", self.license_link)) if v})
        return data


def _append_unique(items: list[str], item: str | None) -> None:
    if item and item not in items:
        items.append(item)


def _terms_of(parent: ParentLicense) -> LicenseTerms | None:
    key = normalize_license(parent.license)
    if key == "other" and parent.license_name:
        key = normalize_license(parent.license_name)
    return KNOWN_LICENSES.get(key) if key else None


def resolve_license(parents: list[ParentLicense], *, override: str | None = None) -> LicenseResolution:
    """The output license of a model made from ``parents`` (see the module docstring).

    ``override`` (``mtool card --license``) sets the published license; the parents' terms are still
    collected, and an override less restrictive than a parent's license is reported.
    """
    known: list[tuple[ParentLicense, LicenseTerms]] = []
    unknown: list[ParentLicense] = []
    reports: list[str] = []
    for parent in parents:
        terms = _terms_of(parent)
        if terms is None:
            unknown.append(parent)
        else:
            known.append((parent, terms))
            if parent.inferred:
                reports.append(f"the license of {parent.parent} ({terms.id}) is inferred from its publisher, "
                               "not declared in the lineage; check its model card")
    for parent in unknown:
        if parent.license is None:
            reports.append(f"{parent.parent} declares no license")
        elif normalize_license(parent.license) == "other":
            where = parent.license_link or "no license_link"
            reports.append(f"{parent.parent} uses a custom license ({parent.license_name or 'unnamed'}, {where}); "
                           "read its terms before publishing")
        else:
            reports.append(f"{parent.parent} declares an unknown license {parent.license!r}")

    undeclared = [parent.parent for parent in unknown if parent.license is None]
    resolution = LicenseResolution(license="other", reports=reports, undeclared=undeclared)
    for _, terms in known:
        _append_unique(resolution.notices, terms.notice)
        _append_unique(resolution.attributions, terms.attribution)
        for condition in terms.conditions:
            _append_unique(resolution.conditions, condition)
        resolution.non_commercial |= terms.rank >= NON_COMMERCIAL
        resolution.derivatives_forbidden |= terms.rank == NO_DERIVATIVES
        if terms.name_prefix and not resolution.name_prefix:
            resolution.name_prefix = terms.name_prefix
    if resolution.derivatives_forbidden:
        forbidding = sorted({t.id for _, t in known if t.rank == NO_DERIVATIVES})
        reports.append(f"{', '.join(forbidding)} forbids distributing derivatives: do not publish this model")

    top_rank = max((terms.rank for _, terms in known), default=None)
    top = [] if top_rank is None else list({t.id: t for _, t in known if t.rank == top_rank}.values())
    resolution.governing = top
    if undeclared:
        resolution.license = None
    elif unknown:
        names = [p.license_name for p in unknown if p.license_name]
        links = [p.license_link for p in unknown if p.license_link]
        resolution.license_name = names[0] if len(unknown) == 1 and names else None
        resolution.license_link = links[0] if len(unknown) == 1 and links else None
    elif len(top) == 1:
        terms = top[0]
        if terms.hub_other:
            resolution.license_name, resolution.license_link = terms.id, terms.link
        else:
            resolution.license = terms.id
    elif top_rank is not None and top_rank <= PERMISSIVE:
        chosen = min(top, key=lambda t: (_PERMISSIVE_PREFERENCE.index(t.id) if t.id in _PERMISSIVE_PREFERENCE
                                         else len(_PERMISSIVE_PREFERENCE), t.id))
        resolution.license, resolution.governing = chosen.id, [chosen]
    elif top:
        resolution.license_name = "-and-".join(t.id for t in top)
        reports.append(f"the parents' licenses {' and '.join(t.id for t in top)} all bind this model; "
                       "publish it only if you can meet every one of them")
    else:
        resolution.license = None
        reports.append("no license is declared")

    if override:
        chosen = normalize_license(override) or override
        chosen_terms = KNOWN_LICENSES.get(chosen)
        if top_rank is not None and chosen_terms is not None and chosen_terms.rank < top_rank:
            reports.append(f"--license {chosen} is less restrictive than the parents' "
                           f"{', '.join(t.id for t in top)}")
        if chosen_terms is not None and chosen_terms.hub_other:
            resolution.license, resolution.license_name, resolution.license_link = "other", chosen, chosen_terms.link
        else:
            resolution.license = chosen
            resolution.license_name = resolution.license_link = None
        resolution.overridden = True
    if resolution.license == "other" and not (resolution.license_name and resolution.license_link):
        reports.append("license is 'other' without license_name and license_link: pass --license or add them "
                       "to the parents' cards")
    return resolution


# Licenses of the major publishers' base models, for Hub parents whose card is not at hand. Each entry:
# (owner, name pattern, license). Used only when the lineage does not declare the license; reported.
_PUBLISHER_LICENSES: tuple[tuple[str, str, str], ...] = (
    ("meta-llama", r"(meta-)?llama-2-.*", "llama2"),
    ("meta-llama", r"(meta-)?llama-3-.*", "llama3"),
    ("meta-llama", r"(meta-)?llama-3\.1-.*", "llama3.1"),
    ("meta-llama", r"llama-3\.2-.*", "llama3.2"),
    ("meta-llama", r"llama-3\.3-.*", "llama3.3"),
    ("meta-llama", r"llama-4-.*", "llama4"),
    ("google", r"(code)?gemma-.*", "gemma"),
    ("mistralai", r"(mistral-7b|mixtral-8x7b|mixtral-8x22b|mistral-nemo|mathstral|ministral-8b-instruct-2410).*",
     "apache-2.0"),
    ("qwen", r"qwen2\.5-(?:coder-|math-)?3b.*", "qwen-research"),
    ("qwen", r"qwen2\.5-72b.*", "qwen"),
    ("qwen", r"qwen(2|2\.5|3)-.*", "apache-2.0"),
    ("microsoft", r"(phi-2|phi-3|phi-3\.5|phi-4).*", "mit"),
)


def publisher_license(model_id: str) -> str | None:
    """The license a major publisher's base model is released under (by its Hub id), or None."""
    if model_id.count("/") != 1:
        return None
    owner, name = model_id.lower().split("/")
    for publisher, pattern, license_id in _PUBLISHER_LICENSES:
        if owner == publisher and re.fullmatch(pattern, name):
            return license_id
    return None
