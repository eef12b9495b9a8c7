"""How good transcoders and circuits are: `tc eval` (sparsity, reconstruction, next-token loss with
MLPs replaced), `tc validate` (necessity, sufficiency, faithfulness), the greater-than task and
`tc plot`'s figures."""
