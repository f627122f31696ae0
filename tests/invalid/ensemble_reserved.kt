# ensemble_reserved.kt: `ensemble(...)` is reserved syntax, not trained yet
# expect: E311
graph ensemble_reserved
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
node c : cnn_small
node e : ensemble(b, c)
label -> a : through
label -> b : through
label -> c : through
e     -> a : through
