"""Writers for `finetune predict`: predictions as an aligned table, CSV or a JSON array, written as they stream
in (a large folder shows its first rows at once), each returning the predictions that failed."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import Any, TextIO

from rich.console import Console


class PredictionWriter:
    """Writes predictions as they stream in; returns the failed ones."""

    def __init__(self, sink: TextIO, top_k: int, labels: list[str]) -> None:
        self.sink, self.labels = sink, labels
        self.top_k = min(top_k, len(labels))

    def write_all(self, stream: Iterable[Any]) -> list[Any]:
        failed = []
        self.start()
        for prediction in stream:
            if prediction.ok:
                self.row(prediction)
            else:
                failed.append(prediction)
                self.failure(prediction)
        self.end()
        return failed

    def start(self) -> None: ...
    def row(self, prediction: Any) -> None: ...
    def failure(self, prediction: Any) -> None: ...
    def end(self) -> None: ...


class PredictionTable(PredictionWriter):
    """Aligned columns, path last so that long paths do not break the alignment."""

    def start(self) -> None:
        self.console = Console(file=self.sink)
        self.width = max(len("label"), *(len(label) for label in self.labels))
        alternatives = f"next {self.top_k - 1}" if self.top_k > 1 else ""
        self.alt_width = (self.top_k - 1) * (self.width + 8)
        self._print(f"{'label':<{self.width}}  score  {alternatives:<{self.alt_width}}  path", style="bold")

    def row(self, p: Any) -> None:
        others = "".join(f"{label:<{self.width}} {score:5.3f}  " for label, score in p.top_k[1:])
        self._print(f"{p.label:<{self.width}}  {p.score:5.3f}  {others:<{self.alt_width}}  {p.source}")

    def _print(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


class PredictionCsv(PredictionWriter):
    def start(self) -> None:
        self.writer = csv.writer(self.sink)
        ranks = [f"top{i}_{field}" for i in range(1, self.top_k + 1) for field in ("label", "score")]
        self.writer.writerow(["path", "label", "score", *ranks, "error"])

    def row(self, p: Any) -> None:
        ranks = [v for label, score in p.top_k for v in (label, f"{score:.6f}")]
        ranks += [""] * (2 * self.top_k - len(ranks))
        self.writer.writerow([p.source, p.label, f"{p.score:.6f}", *ranks, ""])

    def failure(self, p: Any) -> None:
        self.writer.writerow([p.source, "", "", *[""] * (2 * self.top_k), p.error])


class PredictionJson(PredictionWriter):
    """A JSON array, written element by element."""

    def start(self) -> None:
        self.count = 0
        self.sink.write("[")

    def row(self, p: Any) -> None:
        self.sink.write(("," if self.count else "") + "\n  " + json.dumps(p.to_dict()))
        self.count += 1

    failure = row

    def end(self) -> None:
        self.sink.write("\n]\n" if self.count else "]\n")


WRITERS: dict[str, type[PredictionWriter]] = {"table": PredictionTable, "csv": PredictionCsv,
                                               "json": PredictionJson}
