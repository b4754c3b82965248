"""One module or package per `pipeline` command. Stages never import each other: what two of
them share lives in a layer below (core, formats, ml)."""
