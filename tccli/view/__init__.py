"""`tc view`: a graph as one self-contained HTML page to explore in a browser (tccli.view.page), and the
graph files it reads besides tc's own (tccli.view.graph_files)."""
