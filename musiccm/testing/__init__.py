"""Real test doubles (servers, fixtures helpers) shared by tests, benchmarks and scripts."""
