"""MkDocs hooks for the somax site (see ``mkdocs.yml``).

The pages in ``docs/`` link to repository files outside ``docs/`` with relative links
(``../CHANGELOG.md``, ``../benchmarks/results/*.png``) so that they also work when read
in the repository. On the site:

* ``CHANGELOG.md`` becomes the page ``changelog.md``;
* every other linked repository file is copied to ``repo/<its path>``;

and the links are rewritten to point there.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

_LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?\))")
_CHANGELOG = "CHANGELOG.md"
_outside: dict[str, str] = {}  # repository path -> site path


def _repo_target(src_uri: str, link: str, docs_dir: Path, root: Path) -> str | None:
    """The repository path a relative link of page ``src_uri`` points to, when outside ``docs/``."""
    if "://" in link or link.startswith(("/", "mailto:")):
        return None
    target = (docs_dir / posixpath.dirname(src_uri) / link).resolve()
    if target.is_relative_to(docs_dir) or not target.is_relative_to(root) or not target.is_file():
        return None
    return target.relative_to(root).as_posix()


def on_files(files: Files, config) -> Files:
    docs_dir = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    _outside.clear()
    _outside[_CHANGELOG] = "changelog.md"
    files.append(File.generated(config, "changelog.md", abs_src_path=str(root / _CHANGELOG)))
    for page in files.documentation_pages():
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for match in _LINK.finditer(text):
            path = _repo_target(page.src_uri, match.group(2), docs_dir, root)
            if path is not None and path not in _outside:
                _outside[path] = f"repo/{path}"
                files.append(File.generated(config, f"repo/{path}", abs_src_path=str(root / path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        path = _repo_target(page.file.src_uri, match.group(2), docs_dir, root)
        if path is None or path not in _outside:
            return match.group(0)
        return match.group(1) + posixpath.relpath(_outside[path], here or ".") + match.group(3)

    if page.file.src_uri == "changelog.md":
        return markdown
    return _LINK.sub(rewrite, markdown)
