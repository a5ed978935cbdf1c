"""Where the tokens live between processes: the store contract and its two stores."""
