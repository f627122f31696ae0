# data_path_on_a_named_dataset.kt: digits is found by dclang; a path would be ignored
# expect: E604
graph data_path_on_a_named_dataset
data digits { path = "digits.npz" }
node a : cnn_tiny [target]
label -> a : through
