# The two commands of the README. Everything they need is installed by tools/dev.
.PHONY: demo test setup lint
demo:
	tools/dev demo
test:
	tools/dev test
setup:
	tools/dev setup
lint:
	tools/dev cargo fmt --all -- --check
	tools/dev cargo clippy --workspace --all-targets -- -D warnings
