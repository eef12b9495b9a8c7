"""`tc serve`: a local HTTP server that shows `tc view`'s page and adds what needs the model: a graph for a
typed prompt (as `tc graph` computes it), interventions on chosen nodes (as `tc intervene` runs them) and the
pinned subgraph validated (as `tc validate` does).

It owns the server and its routes (tccli.serve.server), the loaded model and the requests' checks and work
(tccli.serve.session), the single worker thread that runs all model work in turn (tccli.serve.worker), and the
page's serve panel (serve-bar.html, serve-side.html, serve.css, serve.js). It sits above graph, evaluation and
view, and below the CLI.
"""
