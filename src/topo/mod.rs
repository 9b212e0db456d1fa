//! Node hardware: topology model, discovery, node sharing and task placement.
