# warnings_only.kt: a file that checks, with each warning the language gives
# expect: W500 W503 W504
graph warnings_only
data digits { val_split = 300 }
train {
  epochs = 8
  schedule = step(milestones=[4, 8])
}
node a : cnn_tiny  [target]
node b : cnn_small
node c : mlp
label -> a : through
label -> c : through
b     -> a : through
