//! Graph-to-graph passes over the Kiln IR (fusion, memory planning, rewrites).
