"""The human baseline (the paper's Appendix A): people answer the examples of a binary task on a web page, and
their answers are scored like a probe's predictions.

- `study.py`: what is asked. A balanced, seeded sample of one evaluated split (n/2 true, n/2 false), the same
  items for every annotator or `overlap` shared items plus a block of each annotator's own, a few practice
  items first (not scored), and how an item is shown (an RCM item: its phrase and claimed cell; any other:
  its caption).
- `store.py`: where answers go. One SQLite file (WAL, one transaction per answer, one answer per annotator
  and item), which also holds the study, so a restarted server resumes it and refuses another.
- `server.py`: the page and its JSON API (FastAPI served by uvicorn; the page is plain HTML and JavaScript in
  `page.html`). Only the sampled images are served, by item number.
- `scoring.py`: the paper's exclusions, accuracy with a bootstrap interval, Fleiss' kappa (statsmodels), the
  answers as a run folder that `probing analyze` and `probing report` read as Table 1's Human row; export.
- `commands.py`: `probing annotate serve | score | export`.
"""
