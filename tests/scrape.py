"""Reading Prometheus text exposition in tests: scrape once, then look samples up by labels."""

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Samples:
    """Every sample of one scrape, by name and labels."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when it does not exist (yet)."""
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of `name` whose labels include these."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and wanted <= set(ls))

    def names(self) -> set[str]:
        return {name for name, _ in self.values}


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10, trust_env=False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Samples(response.text)
