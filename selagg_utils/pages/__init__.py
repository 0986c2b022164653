"""Engine room: what the book's pages need beyond a running kernel, behind `selagg_utils.viz`.

`explorer` precomputes the attention explorer's views as HTML with sliders, so that a page read
without a kernel can still be explored; `figure_text` measures the smallest text of a figure at the
page's column width, which the book's tests check. `viz.attention_explorer` is its one door.
"""
