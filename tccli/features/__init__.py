"""What features do: `tc score`'s one-pass statistics (density, top and quantile examples,
de-embeddings, logit effects), the features files it writes, and `tc show`'s terminal and HTML views."""
