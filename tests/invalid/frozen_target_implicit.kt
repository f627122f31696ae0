# frozen_target_implicit.kt: every edge into the target is cutoff, which makes it frozen (paper 3.4)
# expect: E304
graph frozen_target_implicit
data digits { val_split = 300 }
node a : cnn_tiny [target]
label -> a : cutoff
