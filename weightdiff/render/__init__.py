"""Rendering from the compare JSON alone: captions and headlines, figures, the memo.

``captions`` writes sentences from the numbers, ``plots`` draws the five figures,
``memo`` lays out the HTML and Markdown memo (its fixed prose lives in ``memo_text``).
Each reads the plain dict of ``schema: weightdiff.compare/2``, never the checkpoints,
so ``weightdiff report result.json`` can redraw everything later.
"""
