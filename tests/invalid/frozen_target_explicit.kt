# frozen_target_explicit.kt: the target is declared frozen, so it could never improve
# expect: E304
graph frozen_target_explicit
data digits { val_split = 300 }
node a : cnn_tiny [target, frozen]
