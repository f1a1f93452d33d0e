"""handoff's engine. The public interface is re-exported here (see DESIGN.md)."""
